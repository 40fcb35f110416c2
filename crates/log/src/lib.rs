//! Log output shared by every Verge executable.
//!
//! * Filter: `RUST_LOG` (tracing's `EnvFilter` syntax) when set; otherwise
//!   `RuntimeLogLevel`, the variable Azure IoT Edge users already set in the
//!   daemon's `[agent.env]` and module `env` (the agent passes it on to every
//!   module): `fatal`, `error`, `warning`, `info`, `debug` or `verbose`.
//!   Levels above `info` apply to Verge's own crates only, so `debug` does
//!   not bring every TLS and HTTP library's chatter with it. `info` when
//!   neither is set, or when the value is not understood (with a warning).
//! * Format: `VERGE_LOG_FORMAT=text` (default) or `json` (one JSON object
//!   per line, for log shippers).
//! * Colour only when the stream is a terminal and `NO_COLOR` is unset: the
//!   daemons' output usually lands in files (verged keeps each module's
//!   output for `verge logs`), where escape codes are noise.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (modules, whose stdout is their log).
    Stdout,
    /// Standard error (programs whose stdout is for results).
    Stderr,
}

/// The line format, from `VERGE_LOG_FORMAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable text with `key=value` fields.
    Text,
    /// One JSON object per line.
    Json,
}

impl Format {
    /// Parses a `VERGE_LOG_FORMAT` value (case-insensitive).
    pub fn parse(value: &str) -> Result<Format, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "VERGE_LOG_FORMAT={other:?} is neither \"text\" nor \"json\"; using text"
            )),
        }
    }
}

/// What every target of Verge's crates starts with (`verge_hub::upstream`,
/// `verge_store`, …); filter directives match targets by prefix, so this
/// one name covers all of them, crates added later included.
const OWN_TARGET_PREFIX: &str = "verge";

/// The filter directives for a `RuntimeLogLevel` value (Azure IoT Edge's
/// names, plus tracing's own).
pub fn runtime_log_level(value: &str) -> Result<String, String> {
    let level = match value.trim().to_ascii_lowercase().as_str() {
        "fatal" | "error" => "error",
        "warning" | "warn" => "warn",
        "info" | "information" => "info",
        "debug" => "debug",
        "verbose" | "trace" => "trace",
        _ => {
            return Err(format!(
                "RuntimeLogLevel={value:?} is not one of fatal, error, warning, info, debug, verbose; using info"
            ));
        }
    };
    if matches!(level, "debug" | "trace") {
        Ok(format!("info,{OWN_TARGET_PREFIX}={level}"))
    } else {
        Ok(level.to_owned())
    }
}

/// The filter, and what was wrong with the settings if anything.
fn filter() -> (EnvFilter, Option<String>) {
    if let Ok(v) = std::env::var("RUST_LOG")
        && !v.trim().is_empty()
    {
        return match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!(
                    "RUST_LOG={v:?} is not a valid filter ({e}); using info"
                )),
            ),
        };
    }
    match std::env::var("RuntimeLogLevel") {
        Ok(v) => match runtime_log_level(&v) {
            Ok(d) => (EnvFilter::new(d), None),
            Err(e) => (EnvFilter::new("info"), Some(e)),
        },
        Err(_) => (EnvFilter::new("info"), None),
    }
}

/// Installs the process-wide subscriber. Call once, first thing in `main`;
/// a second call (or another subscriber already installed) is ignored.
/// Settings it cannot use are reported as warnings once it is installed.
pub fn init(stream: Stream) {
    let (filter, bad_filter) = filter();
    let (format, bad_format) = match std::env::var("VERGE_LOG_FORMAT") {
        Ok(v) => match Format::parse(&v) {
            Ok(f) => (f, None),
            Err(e) => (Format::Text, Some(e)),
        },
        Err(_) => (Format::Text, None),
    };
    let terminal = match stream {
        Stream::Stdout => std::io::stdout().is_terminal(),
        Stream::Stderr => std::io::stderr().is_terminal(),
    };
    let ansi = colour(terminal, std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match (format, stream) {
        (Format::Text, Stream::Stdout) => builder.with_ansi(ansi).try_init(),
        (Format::Text, Stream::Stderr) => builder
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .try_init(),
        (Format::Json, Stream::Stdout) => builder.json().with_ansi(false).try_init(),
        (Format::Json, Stream::Stderr) => builder
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    if installed.is_ok() {
        for c in [bad_filter, bad_format].into_iter().flatten() {
            tracing::warn!("{c}");
        }
    }
}

/// Whether to colour: on a terminal, unless `NO_COLOR` is set to anything
/// non-empty (no-color.org).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(Format::parse("text"), Ok(Format::Text));
        assert_eq!(Format::parse(""), Ok(Format::Text));
        assert_eq!(Format::parse(" JSON "), Ok(Format::Json));
        let e = Format::parse("yaml").unwrap_err();
        assert!(e.contains("\"yaml\""), "{e}");
    }

    #[test]
    fn runtime_log_levels() {
        assert_eq!(runtime_log_level("fatal").unwrap(), "error");
        assert_eq!(runtime_log_level("Warning").unwrap(), "warn");
        assert_eq!(runtime_log_level("info").unwrap(), "info");
        // Which targets these reach: tests/output.rs (`verge_hub::…` and
        // `verge_log::…` yes, `rustls::…` no).
        assert_eq!(runtime_log_level("debug").unwrap(), "info,verge=debug");
        assert_eq!(runtime_log_level("verbose").unwrap(), "info,verge=trace");
        let e = runtime_log_level("loud").unwrap_err();
        assert!(e.contains("\"loud\""), "{e}");
        for level in ["fatal", "warning", "info", "debug", "verbose"] {
            EnvFilter::try_new(runtime_log_level(level).unwrap()).unwrap();
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".as_ref())));
        assert!(!colour(true, Some("1".as_ref())));
        assert!(!colour(false, None));
    }
}
