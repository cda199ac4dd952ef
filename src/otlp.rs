//! OpenTelemetry trace export: the `job`, `session` and `step` spans sent to a collector over
//! OTLP/HTTP (protobuf), configured by the standard `OTEL_*` variables.
//!
//! ```text
//! tracing spans ─Targets(KATZ_TRACE | default)─▶ tracing-opentelemetry ─▶ batch processor
//!   (its own thread) ─▶ OTLP/HTTP POST $OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces ─▶ collector
//! ```
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
//! (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`). The exporter reads
//! the rest itself: `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`, `OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME` (default: `katz-<command>`). Only the
//! `http/protobuf` protocol is built in (no gRPC, no TLS client); another is refused at start.
//! Spans are batched off the job's threads; [`Export::shutdown`] flushes what is left when the
//! process ends (a worker's drain included).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::Targets;

/// The spans exported unless `KATZ_TRACE` says otherwise: jobs and ControlNet sessions (info),
/// their denoising steps (debug), and warnings from anywhere.
pub const DEFAULT_TRACE_FILTER: &str = "warn,katz_actors=info,katz_onnx=debug,katz=info";

/// What the environment asks for (read once per process: the filter's size does not matter).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum OtlpConfig {
    /// No endpoint (or export disabled): nothing is exported.
    Off,
    /// Export to the endpoint the exporter derives from the variables.
    Http {
        /// The endpoint as given (for the start-up line; the exporter reads the variables).
        endpoint: String,
        /// `OTEL_SERVICE_NAME`, else `katz-<command>`.
        service: String,
        /// Which spans (`KATZ_TRACE`, `Targets` syntax: `warn,katz_onnx=debug`).
        filter: Targets,
    },
}

impl OtlpConfig {
    /// Reads the configuration from `var` (the process environment in [`OtlpConfig::from_env`]).
    pub fn from_vars(command: &str, var: impl Fn(&str) -> Option<String>) -> Result<OtlpConfig, String> {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(OtlpConfig::Off);
        }
        let endpoint =
            match set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT")) {
                Some(e) => e,
                None => return Ok(OtlpConfig::Off),
            };
        match set("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(OtlpConfig::Off),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other:?}: katz exports traces with `otlp` (or `none`)"
                ))
            }
        }
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = set(k) {
                if p.trim() != "http/protobuf" {
                    return Err(format!(
                        "{k}={p:?}: katz exports traces over OTLP/HTTP with `http/protobuf` only \
                         (a collector's port 4318)"
                    ));
                }
                break;
            }
        }
        if endpoint.trim_start().starts_with("https://") {
            return Err(format!(
                "OTLP endpoint {endpoint:?}: katz has no TLS client; use http:// to a collector \
                 on the host or a private network"
            ));
        }
        url::Url::parse(endpoint.trim())
            .map_err(|e| format!("OTLP endpoint {endpoint:?} is not a URL: {e}"))?;
        let filter: Targets = set("KATZ_TRACE")
            .unwrap_or_else(|| DEFAULT_TRACE_FILTER.into())
            .parse()
            .map_err(|e| format!("KATZ_TRACE: {e}"))?;
        let service = set("OTEL_SERVICE_NAME").unwrap_or_else(|| format!("katz-{command}"));
        Ok(OtlpConfig::Http {
            endpoint,
            service,
            filter,
        })
    }

    /// [`OtlpConfig::from_vars`] over the process environment.
    pub fn from_env(command: &str) -> Result<OtlpConfig, String> {
        OtlpConfig::from_vars(command, |k| std::env::var(k).ok())
    }
}

/// A running export: the layer to install and the provider to flush at the end.
pub struct Export {
    provider: SdkTracerProvider,
}

impl Export {
    /// Builds the exporter (it reads the `OTEL_EXPORTER_OTLP_*` variables) and the `tracing`
    /// layer that feeds it, exporting as `service`.
    pub fn start<S>(
        service: &str,
    ) -> Result<
        (
            Export,
            tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
        ),
        String,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("the OTLP trace exporter: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("katz");
        Ok((
            Export { provider },
            tracing_opentelemetry::layer().with_tracer(tracer),
        ))
    }

    /// Sends what is still batched and stops the export thread.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: the last traces were not all exported: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<OtlpConfig, String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OtlpConfig::from_vars("worker", |k| m.get(k).cloned())
    }

    #[test]
    fn export_is_off_without_an_endpoint_or_when_disabled() {
        assert_eq!(read(&[]), Ok(OtlpConfig::Off));
        assert_eq!(read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), Ok(OtlpConfig::Off));
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert!(matches!(read(&on), Ok(OtlpConfig::Http { .. })));
        assert_eq!(read(&[on[0], ("OTEL_SDK_DISABLED", "TRUE")]), Ok(OtlpConfig::Off));
        assert_eq!(
            read(&[on[0], ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(OtlpConfig::Off)
        );
    }

    #[test]
    fn the_service_name_defaults_to_the_command() {
        let on = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces",
        );
        match read(&[on]).unwrap() {
            OtlpConfig::Http {
                service, endpoint, ..
            } => {
                assert_eq!(service, "katz-worker");
                assert_eq!(endpoint, on.1);
            }
            other => panic!("{other:?}"),
        }
        match read(&[on, ("OTEL_SERVICE_NAME", "render-farm")]).unwrap() {
            OtlpConfig::Http { service, .. } => assert_eq!(service, "render-farm"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_cannot_be_exported_is_refused_with_its_variable() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let grpc = read(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(grpc.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && grpc.contains("http/protobuf"));
        // the traces-specific variable wins over the general one
        assert!(read(&[
            on,
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .is_ok());
        let tls = read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")]).unwrap_err();
        assert!(tls.contains("TLS"));
        assert!(read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector")])
            .unwrap_err()
            .contains("not a URL"));
        assert!(read(&[on, ("OTEL_TRACES_EXPORTER", "zipkin")])
            .unwrap_err()
            .contains("otlp"));
        assert!(read(&[on, ("KATZ_TRACE", "katz=loud")])
            .unwrap_err()
            .contains("KATZ_TRACE"));
    }
}
