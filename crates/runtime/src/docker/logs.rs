//! A container's log stream as output lines: Docker's frames split into
//! lines, each with its timestamp (or the one of the line before), cut to
//! the exact since/until window `GET /modules/{name}/logs` asks for.

use bollard::container::LogOutput;
use bytes::Bytes;
use verge_core::time::Timestamp;

/// Turns one log frame (`<RFC 3339 nano timestamp> <text>`) into output lines,
/// applying the exact since/until window.
pub(super) fn frame_lines(
    chunk: LogOutput,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    timestamps: bool,
) -> Vec<Bytes> {
    let data = chunk.into_bytes();
    let mut out = Vec::new();
    let mut current: Option<(&[u8], Option<Timestamp>)> = None;
    for raw in data.split(|b| *b == b'\n') {
        // A frame normally holds one line; a line without its own timestamp
        // shares the one of the line before.
        let (ts_text, ts, msg) = match split_timestamp(raw) {
            Some((text, ts, msg)) => {
                current = Some((text, Some(ts)));
                (text, Some(ts), msg)
            }
            None => match current {
                Some((text, ts)) => (text, ts, raw),
                None => (&b""[..], None, raw),
            },
        };
        if raw.is_empty() {
            continue;
        }
        if let Some(ts) = ts
            && (since.is_some_and(|s| ts < s) || until.is_some_and(|u| ts >= u))
        {
            continue;
        }
        let mut line = Vec::with_capacity(msg.len() + ts_text.len() + 2);
        if timestamps && !ts_text.is_empty() {
            line.extend_from_slice(ts_text);
            line.push(b' ');
        }
        line.extend_from_slice(msg);
        line.push(b'\n');
        out.push(Bytes::from(line));
    }
    out
}

fn split_timestamp(raw: &[u8]) -> Option<(&[u8], Timestamp, &[u8])> {
    let sp = raw.iter().position(|b| *b == b' ').unwrap_or(raw.len());
    let text = &raw[..sp];
    let ts = Timestamp::parse(std::str::from_utf8(text).ok()?).ok()?;
    Some((text, ts, raw.get(sp + 1..).unwrap_or_default()))
}
