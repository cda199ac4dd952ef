//! How katz logs: to stderr, as text (colours only when stderr is a terminal and `NO_COLOR` is
//! unset) or as JSON lines (`KATZ_LOG_FORMAT=json`), filtered by `KATZ_LOG`; every line is
//! scrubbed of the passwords of the broker URLs the process was given.
//!
//! ```text
//! tracing events ─EnvFilter(KATZ_LOG | default)─▶ fmt: text | json ─▶ Scrubbed(stderr) ─▶ fd 2
//!                            passwords of every URL in argv and the environment ─┘
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

/// Installs the process's subscriber; `default_filter` applies where `KATZ_LOG` is unset.
pub fn init(default_filter: &str, secrets: Secrets) -> Result<(), String> {
    let format: LogFormat = std::env::var("KATZ_LOG_FORMAT").unwrap_or_default().parse()?;
    let filter = EnvFilter::try_from_env("KATZ_LOG").unwrap_or_else(|_| default_filter.into());
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let writer = Scrubbed { secrets };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
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
