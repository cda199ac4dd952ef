//! A job's trace across processes: the W3C `traceparent` of the span a message is sent from,
//! and the remote parent of the span that handles it (OpenTelemetry's trace-context
//! propagator). Without an exporting subscriber there is no trace context, and nothing travels.
//!
//! ```text
//! base worker: job span ─ traceparent() ─▶ SessionOpen.traceparent ─▶ ControlNet worker:
//!   session span ─ set_remote_parent(…): one trace, the session a child of the job's step
//! ```

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const KEY: &str = "traceparent";

/// The `traceparent` of the current span, or None where spans are not exported.
pub fn traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(KEY)
}

/// Makes `span` (just created, not yet exported) a child of the remote span `traceparent`
/// names; a malformed value, or no exporting subscriber, leaves it a root.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(KEY.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_travels_without_an_exporting_subscriber() {
        let span = tracing::info_span!("job");
        let _g = span.enter();
        assert_eq!(traceparent(), None);
        // a malformed or valid parent on a span nobody exports is no error
        set_remote_parent(&span, "not a traceparent");
        set_remote_parent(&span, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }
}
