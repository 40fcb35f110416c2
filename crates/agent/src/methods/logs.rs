//! Module logs for `GetModuleLogs`, `UploadModuleLogs` and the support
//! bundle: which modules a request's items select, reading their logs from
//! the runtime (bounded), edgeAgent's per-line filters (`loglevel`,
//! `regex`) and its two output shapes (`text`, `json`), optionally gzipped.
//!
//! JSON lines say `"stream": "stdout"` for every line: the runtime's log
//! stream ([`verge_runtime::LogStream`]) does not say which of the module's
//! streams a line came from.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use regex::Regex;
use serde_json::{Value, json};
use verge_core::time::Timestamp;
use verge_runtime::{LogOptions, ModuleRuntime};

use super::MethodError;

/// Syslog severity of a line without a `<N>` prefix (edgeAgent's default:
/// informational).
pub const DEFAULT_LOG_LEVEL: u8 = 6;

/// How long reading one module's logs may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `contentType` of a logs request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// The lines as the module printed them.
    Text,
    /// A JSON array of `{iothub, device, id, stream, loglevel, text, timestamp}`.
    Json,
}

/// `encoding` of a logs request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `payload` holds the text.
    None,
    /// `payloadBytes` holds base64 of the gzipped text.
    Gzip,
}

/// One item's `filter`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Last N lines (applied by the runtime, before the other filters).
    pub tail: Option<usize>,
    /// Lines at or after.
    pub since: Option<Timestamp>,
    /// Lines before.
    pub until: Option<Timestamp>,
    /// Keep lines whose severity is at most this.
    pub loglevel: Option<u8>,
    /// Keep lines whose text matches.
    pub regex: Option<Regex>,
}

/// One entry of `items`: a module-name pattern and its filter.
#[derive(Debug, Clone)]
pub struct Item {
    /// `all`, or a regex searched (case-insensitively) in module names.
    pub id: Option<Regex>,
    /// The filter for the modules it selects.
    pub filter: Filter,
}

impl Item {
    /// Parses `id` (`all` selects every module) as edgeAgent does: a regex
    /// searched case-insensitively, not anchored.
    pub fn new(id: &str, filter: Filter) -> Result<Self, MethodError> {
        let id = if id.eq_ignore_ascii_case("all") {
            None
        } else {
            Some(
                regex::RegexBuilder::new(id)
                    .case_insensitive(true)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| MethodError::BadRequest(format!("invalid id {id:?}: {e}")))?,
            )
        };
        Ok(Self { id, filter })
    }

    fn selects(&self, module: &str) -> bool {
        self.id.as_ref().is_none_or(|r| r.is_match(module))
    }
}

/// The modules `items` select, each with the filter of the first item
/// that matches it, in name order.
pub fn select(mut modules: Vec<String>, items: &[Item]) -> Vec<(String, Filter)> {
    modules.sort();
    modules.dedup();
    modules
        .into_iter()
        .filter_map(|m| {
            let f = items.iter().find(|i| i.selects(&m))?.filter.clone();
            Some((m, f))
        })
        .collect()
}

/// One log line, split as edgeAgent's JSON output has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    /// The line as the module printed it (no runtime timestamp, no newline).
    pub raw: &'a str,
    /// The runtime's timestamp of the line, when it gave one.
    pub timestamp: Option<&'a str>,
    /// Syslog severity from a `<N>` prefix, else [`DEFAULT_LOG_LEVEL`].
    pub level: u8,
    /// The text after the `<N>` prefix (and the time the recommended
    /// format puts after it).
    pub text: &'a str,
}

/// `<N> yyyy-MM-dd hh:mm:ss.fff zzz ` at the start of the recommended
/// line format, after the severity.
fn inline_time() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        #[allow(clippy::unwrap_used)] // a constant pattern, covered by the tests
        Regex::new(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} [+-]\d{2}:\d{2}\s").unwrap()
    })
}

/// Splits a line the runtime gave with `timestamps: true`.
pub fn parse_line(line: &str) -> Line<'_> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let (timestamp, raw) = match line.split_once(' ') {
        Some((t, rest)) if Timestamp::parse(t).is_ok() => (Some(t), rest),
        _ => (None, line),
    };
    let b = raw.as_bytes();
    let (level, text) = if b.len() >= 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>' {
        let rest = raw[3..].trim_start();
        let rest = match inline_time().find(rest) {
            Some(m) => &rest[m.end()..],
            None => rest,
        };
        (b[1] - b'0', rest)
    } else {
        (DEFAULT_LOG_LEVEL, raw)
    };
    Line {
        raw,
        timestamp,
        level,
        text,
    }
}

impl Filter {
    fn keeps(&self, l: &Line<'_>) -> bool {
        self.loglevel.is_none_or(|max| l.level <= max)
            && self.regex.as_ref().is_none_or(|r| r.is_match(l.text))
    }
}

/// Who the JSON lines name.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// IoT hub host name.
    pub iothub: &'a str,
    /// Device id.
    pub device: &'a str,
}

/// Why reading stopped early.
#[derive(Debug)]
pub enum ReadError {
    /// The output grew past the limit.
    TooLarge,
    /// The runtime failed.
    Runtime(String),
}

/// Reads `module`'s logs through `runtime`, keeps the lines `filter`
/// keeps, and renders them as `content`; at most `limit` bytes of output.
pub async fn read(
    runtime: &dyn ModuleRuntime,
    module: &str,
    filter: &Filter,
    content: ContentType,
    origin: &Origin<'_>,
    limit: usize,
) -> Result<Vec<u8>, ReadError> {
    let opts = LogOptions {
        follow: false,
        tail: filter.tail,
        since: filter.since,
        until: filter.until,
        timestamps: true,
    };
    let work = async {
        let mut stream = runtime
            .logs(module, &opts)
            .await
            .map_err(|e| ReadError::Runtime(e.to_string()))?;
        let mut out = Vec::new();
        let mut first = true;
        if content == ContentType::Json {
            out.push(b'[');
        }
        // Chunks hold whole lines; a partial tail waits for the next chunk.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = stream.next().await;
            let done = chunk.is_none();
            match chunk {
                Some(Ok(bytes)) => pending.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(ReadError::Runtime(e.to_string())),
                None => {}
            }
            let cut = if done {
                pending.len()
            } else {
                pending
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1)
            };
            let whole: Vec<u8> = pending.drain(..cut).collect();
            for raw in whole.split_inclusive(|b| *b == b'\n') {
                let text = String::from_utf8_lossy(raw);
                let line = parse_line(&text);
                if !filter.keeps(&line) {
                    continue;
                }
                match content {
                    ContentType::Text => {
                        out.extend_from_slice(line.raw.as_bytes());
                        out.push(b'\n');
                    }
                    ContentType::Json => {
                        if !first {
                            out.push(b',');
                        }
                        let v = json!({
                            "iothub": origin.iothub,
                            "device": origin.device,
                            "id": module,
                            "stream": "stdout",
                            "loglevel": line.level,
                            "text": line.text,
                            "timestamp": line.timestamp,
                        });
                        // Writing JSON into a Vec cannot fail.
                        let _ = serde_json::to_writer(&mut out, &v);
                    }
                }
                first = false;
                if out.len() > limit {
                    return Err(ReadError::TooLarge);
                }
            }
            // A single line longer than the limit must not grow without bound.
            if pending.len() > limit {
                return Err(ReadError::TooLarge);
            }
            if done {
                break;
            }
        }
        if content == ContentType::Json {
            out.push(b']');
        }
        Ok(out)
    };
    tokio::time::timeout(READ_TIMEOUT, work)
        .await
        .map_err(|_| ReadError::Runtime(format!("reading the logs of {module} timed out")))?
}

/// Gzip of `data` (in memory; log payloads are bounded by the caller).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// edgeAgent's `{"id", "payloadBytes", "payload"}` for one module.
pub fn response_entry(module: &str, data: Vec<u8>, encoding: Encoding) -> (Value, usize) {
    use base64::Engine as _;
    match encoding {
        Encoding::None => {
            let n = data.len();
            let text = String::from_utf8(data)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            (
                json!({"id": module, "payloadBytes": null, "payload": text}),
                n,
            )
        }
        Encoding::Gzip => {
            let z = gzip(&data);
            let n = z.len();
            let b64 = base64::engine::general_purpose::STANDARD.encode(z);
            (
                json!({"id": module, "payloadBytes": b64, "payload": null}),
                n,
            )
        }
    }
}

/// A `since`/`until` value: a JSON number of Unix seconds, or a string
/// (RFC 3339, Unix seconds, or a duration before now: `2d`, `90 m`).
pub fn time_point(v: &Value, now: SystemTime) -> Result<Timestamp, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(|s| Timestamp::from_millis(s.saturating_mul(1000)))
            .ok_or_else(|| format!("{n} is not a whole number of seconds")),
        Value::String(s) => verge_diag::times::parse_point(s, now).map_err(|e| format!("{e:#}")),
        other => Err(format!("{other} is not a time")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_split_into_time_level_and_text() {
        let l = parse_line(
            "2026-01-02T03:04:05.123456789Z <3> 2026-01-02 03:04:05.123 +00:00 disk full\n",
        );
        assert_eq!(l.timestamp, Some("2026-01-02T03:04:05.123456789Z"));
        assert_eq!(l.level, 3);
        assert_eq!(l.text, "disk full");
        assert_eq!(l.raw, "<3> 2026-01-02 03:04:05.123 +00:00 disk full");
        let l = parse_line("plain words");
        assert_eq!((l.timestamp, l.level, l.text), (None, 6, "plain words"));
        let l = parse_line("2026-01-02T03:04:05Z <7>debug");
        assert_eq!((l.level, l.text), (7, "debug"));
    }

    #[test]
    fn items_select_modules_case_insensitively_first_match_wins() {
        let f = |t| Filter {
            tail: Some(t),
            ..Filter::default()
        };
        let items = vec![
            Item::new("^edgehub$", f(1)).unwrap(),
            Item::new("ALL", f(2)).unwrap(),
        ];
        let got = select(vec!["modB".into(), "edgeHub".into(), "modA".into()], &items);
        let got: Vec<(String, Option<usize>)> = got.into_iter().map(|(m, f)| (m, f.tail)).collect();
        assert_eq!(
            got,
            vec![
                ("edgeHub".into(), Some(1)),
                ("modA".into(), Some(2)),
                ("modB".into(), Some(2))
            ]
        );
        // unanchored, as .NET's IsMatch
        let items = vec![Item::new("mod", Filter::default()).unwrap()];
        assert_eq!(select(vec!["xmodx".into(), "hub".into()], &items).len(), 1);
        assert!(Item::new("(", Filter::default()).is_err());
    }

    #[test]
    fn filters_by_level_and_regex() {
        let f = Filter {
            loglevel: Some(4),
            regex: Some(Regex::new("^disk").unwrap()),
            ..Filter::default()
        };
        assert!(f.keeps(&parse_line("<3> disk full")));
        assert!(!f.keeps(&parse_line("<6> disk fine")));
        assert!(!f.keeps(&parse_line("<2> cpu hot")));
        assert!(!f.keeps(&parse_line("disk, no level: 6")));
    }

    #[test]
    fn time_points() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(
            time_point(&json!(1700000000), now).unwrap().as_millis(),
            1_700_000_000_000
        );
        assert_eq!(
            time_point(&json!("1 h"), now).unwrap().as_millis(),
            6_400_000
        );
        assert!(time_point(&json!("soon"), now).is_err());
        assert!(time_point(&json!(true), now).is_err());
    }
}
