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
//! * Optionally also to a size-rotated file ([`init_with`], [`LogFile`]):
//!   verged keeps its own log there when no journal keeps its stderr.
//! * The filter can be changed at run time ([`Handle`]).
//! * Colour only when the stream is a terminal and `NO_COLOR` is unset: the
//!   daemons' output usually lands in files (verged keeps each module's
//!   output for `verge logs`), where escape codes are noise.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

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
    let _ = init_with(stream, None);
}

/// The filter of an installed subscriber, changeable at run time
/// (`verge system set-log-level`).
#[derive(Clone)]
pub struct Handle {
    reload: reload::Handle<EnvFilter, Registry>,
}

impl Handle {
    /// Replaces the filter with a `RuntimeLogLevel` value's (`RUST_LOG`,
    /// when set, no longer applies afterwards: the operator asked for this).
    pub fn set_runtime_log_level(&self, level: &str) -> Result<(), String> {
        let directives = runtime_log_level(level)?;
        let filter = EnvFilter::try_new(&directives).map_err(|e| e.to_string())?;
        self.reload.reload(filter).map_err(|e| e.to_string())
    }
}

type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

fn fmt_layer<W>(format: Format, ansi: bool, writer: W) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        Format::Text => layer.with_ansi(ansi).boxed(),
        Format::Json => layer.json().with_ansi(false).boxed(),
    }
}

/// Like [`init`], and also writes every line to `tee` (never coloured):
/// the daemons' own log when no journal keeps their stderr. Returns the
/// handle that changes the filter, `None` if a subscriber was installed
/// already.
pub fn init_with(stream: Stream, tee: Option<LogFile>) -> Option<Handle> {
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
    let (filter, reload) = reload::Layer::new(filter);
    let mut layers: Vec<BoxedLayer> = vec![match stream {
        Stream::Stdout => fmt_layer(format, ansi, std::io::stdout),
        Stream::Stderr => fmt_layer(format, ansi, std::io::stderr),
    }];
    if let Some(file) = tee {
        layers.push(fmt_layer(format, false, FileWriter(Arc::new(file))));
    }
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    if installed.is_err() {
        return None;
    }
    for c in [bad_filter, bad_format].into_iter().flatten() {
        tracing::warn!("{c}");
    }
    Some(Handle { reload })
}

/// A size-rotated log file (`verged.log`, `verged.log.1` …), written a
/// whole line per write (tracing formats an event before writing it).
pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    max_files: usize,
    state: Mutex<Option<(std::fs::File, u64)>>,
}

impl LogFile {
    /// A log at `path`, rotated at `max_bytes`, `max_files` kept (at least
    /// 1); its directory is created, the file opened for appending.
    pub fn open(path: PathBuf, max_bytes: u64, max_files: usize) -> std::io::Result<LogFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = LogFile {
            path,
            max_bytes,
            max_files: max_files.max(1),
            state: Mutex::new(None),
        };
        let file = f.open_file()?;
        let size = file.metadata()?.len();
        *f.lock() = Some((file, size));
        Ok(f)
    }

    /// The `index`th file: 0 is the current one.
    pub fn rotated_path(path: &Path, index: usize) -> PathBuf {
        if index == 0 {
            path.to_path_buf()
        } else {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{index}"));
            PathBuf::from(p)
        }
    }

    fn open_file(&self) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Logs may name devices and modules: owner only.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::fs::File, u64)>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rotate(&self) -> std::io::Result<()> {
        if self.max_files <= 1 {
            return std::fs::remove_file(&self.path);
        }
        for i in (1..self.max_files - 1).rev() {
            match std::fs::rename(
                Self::rotated_path(&self.path, i),
                Self::rotated_path(&self.path, i + 1),
            ) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, Self::rotated_path(&self.path, 1))
    }
}

impl std::io::Write for &LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.lock();
        let len = buf.len() as u64;
        if let Some((_, size)) = st.as_ref()
            && *size > 0
            && size + len > self.max_bytes
        {
            *st = None;
            self.rotate()?;
        }
        if st.is_none() {
            let file = self.open_file()?;
            let size = file.metadata()?.len();
            *st = Some((file, size));
        }
        if let Some((file, size)) = st.as_mut() {
            file.write_all(buf)?;
            *size += len;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct FileWriter(Arc<LogFile>);

impl<'w> MakeWriter<'w> for FileWriter {
    type Writer = &'w LogFile;

    fn make_writer(&'w self) -> Self::Writer {
        &self.0
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
    use std::io::Write as _;

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
    fn log_file_rotates_whole_lines() {
        let dir = std::env::temp_dir().join(format!("verge-log-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/verged.log");
        let f = LogFile::open(path.clone(), 100, 3).unwrap();
        for i in 0..30 {
            (&f).write_all(format!("line {i:04} of the log\n").as_bytes())
                .unwrap();
        }
        let text = |i| std::fs::read_to_string(LogFile::rotated_path(&path, i)).unwrap_or_default();
        assert!(text(0).ends_with("line 0029 of the log\n"), "{}", text(0));
        assert!(text(1).lines().all(|l| l.starts_with("line ")));
        assert!(!text(2).is_empty());
        assert!(!LogFile::rotated_path(&path, 3).exists());
        assert!(text(0).len() <= 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".as_ref())));
        assert!(!colour(true, Some("1".as_ref())));
        assert!(!colour(false, None));
    }
}
