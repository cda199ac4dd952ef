//! How katz logs: to stderr, as text (colours only when stderr is a terminal and `NO_COLOR` is
//! unset) or as JSON lines (`KATZ_LOG_FORMAT=json`), filtered by `KATZ_LOG`; every line is
//! scrubbed of the passwords of the broker URLs the process was given.
//!
//! Spans also go to an OpenTelemetry collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (`otlp.rs`), through their own filter, so exported steps need no debug logging.
//!
//! ```text
//! tracing ─┬─EnvFilter(KATZ_LOG | default)─▶ fmt: text | json ─▶ Scrubbed(stderr) ─▶ fd 2
//!          │                  passwords of every URL in argv and the environment ─┘
//!          └─Targets(KATZ_TRACE | default)─▶ OTLP export (only with an endpoint)
//! ```

use std::io::{IsTerminal, Write};
use std::str::FromStr;

use katz_actors::redact::Secrets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// `KATZ_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`, `spans`).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("KATZ_LOG_FORMAT={other:?}: expected `text` or `json`")),
        }
    }
}

/// The passwords of every URL on the command line or in the environment.
pub fn secrets() -> Secrets {
    let args = std::env::args();
    let env = std::env::vars().map(|(_, v)| v);
    let urls: Vec<String> = args.chain(env).filter(|v| v.contains("://")).collect();
    Secrets::of(urls.iter().map(String::as_str))
}

/// Stderr, each write (one log event) scrubbed of `secrets`.
#[derive(Clone)]
struct Scrubbed {
    secrets: Secrets,
}

struct ScrubbedStderr<'a>(&'a Secrets);

impl Write for ScrubbedStderr<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.0.scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Scrubbed {
    type Writer = ScrubbedStderr<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedStderr(&self.secrets)
    }
}

/// What must outlive the process's work: the trace export, flushed when dropped.
#[must_use = "dropping the guard ends the trace export"]
pub struct Guard(Option<crate::otlp::Export>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(export) = self.0.take() {
            export.shutdown();
        }
    }
}

/// Installs the process's subscriber; `default_filter` applies where `KATZ_LOG` is unset;
/// `command` names the service in exported traces (`katz-<command>`).
pub fn init(default_filter: &str, command: &str, secrets: Secrets) -> Result<Guard, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, Registry};

    let format: LogFormat = std::env::var("KATZ_LOG_FORMAT").unwrap_or_default().parse()?;
    let filter = EnvFilter::try_from_env("KATZ_LOG").unwrap_or_else(|_| default_filter.into());
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let writer = Scrubbed { secrets };
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
    };
    let (export, otel, exporting) = match crate::otlp::OtlpConfig::from_env(command)? {
        crate::otlp::OtlpConfig::Off => (None, None, None),
        crate::otlp::OtlpConfig::Http {
            endpoint,
            service,
            filter,
        } => {
            let (export, layer) = crate::otlp::Export::start::<Registry>(&service)?;
            (
                Some(export),
                Some(layer.with_filter(filter).boxed()),
                Some((endpoint, service)),
            )
        }
    };
    let mut layers = vec![fmt];
    layers.extend(otel);
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| format!("the log subscriber: {e}"))?;
    if let Some((endpoint, service)) = exporting {
        tracing::info!(%endpoint, %service, "exporting traces over OTLP/HTTP");
    }
    Ok(Guard(export))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_format_is_text_or_json() {
        assert_eq!("".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!(" JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml"
            .parse::<LogFormat>()
            .unwrap_err()
            .contains("`text` or `json`"));
    }
}
