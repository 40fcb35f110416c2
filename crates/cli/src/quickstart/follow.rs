//! Following the cloud's D2C log: the telemetry the user sees, the bounded
//! mode's count, and the diagnosis when it falls short.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::{CloudInfo, FILTER_MODULE, Quickstart, SENSOR_MODULE, stop_requested};
use crate::cloud::format_message;

impl Quickstart {
    /// Follows the D2C log until Ctrl-C, or (bounded) until enough messages
    /// arrived or the timeout.
    pub(super) async fn follow(
        &mut self,
        cloud: &CloudInfo,
        timeout: Duration,
    ) -> anyhow::Result<ExitCode> {
        let mut stop = self.stop.clone();
        let bounded = self.args.until_messages.is_some() || self.args.measure;
        let want = if self.args.measure {
            1
        } else {
            self.args.until_messages.unwrap_or(u64::MAX)
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(256);
        let client = cloud.client.clone();
        // Reconnects if the stream breaks (it should not on loopback). A
        // full channel holds the stream back (nothing is dropped).
        let tail = tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                if let Ok(mut r) = client.messages(next, true).await {
                    let mut buf: Vec<u8> = Vec::new();
                    while let Ok(Some(chunk)) = r.chunk().await {
                        buf.extend_from_slice(&chunk);
                        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=nl).collect();
                            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                                continue;
                            };
                            if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                                next = o + 1;
                            }
                            if tx.send(v).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let deadline = tokio::time::Instant::now() + timeout;
        let mut counted = 0u64;
        let mut per_sender: BTreeMap<String, u64> = BTreeMap::new();
        let mut first_at: Option<Duration> = None;
        let mut next_offset = 0u64;
        let mut progress_tick = tokio::time::interval(Duration::from_secs(5));
        progress_tick.tick().await;
        let outcome = loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(v) = msg else { break Outcome::StreamEnded };
                    if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                        next_offset = next_offset.max(o + 1);
                    }
                    let module = v.get("moduleId").and_then(Value::as_str).unwrap_or("");
                    *per_sender.entry(if module.is_empty() { "(device)".into() } else { module.to_owned() }).or_default() += 1;
                    if module == FILTER_MODULE || module == SENSOR_MODULE {
                        counted += 1;
                        if first_at.is_none() {
                            first_at = self.verged_started.map(|t| t.elapsed());
                        }
                    }
                    let mut out = std::io::stdout().lock();
                    // A closed stdout (`| head`) is not a reason to stop.
                    let _ = writeln!(out, "{}", format_message(&v)).and_then(|()| out.flush());
                    if counted >= want {
                        break Outcome::Enough;
                    }
                }
                _ = progress_tick.tick(), if counted == 0 => {
                    eprintln!("… still waiting for the first message ({})", self.status_line().await);
                }
                () = tokio::time::sleep_until(deadline), if bounded => break Outcome::Timeout,
                () = stop_requested(&mut stop) => break Outcome::Signal,
            }
        };
        tail.abort();
        match outcome {
            Outcome::Enough if self.args.measure => {
                let first = first_at.unwrap_or_default();
                self.measure(cloud, first, next_offset, timeout).await?;
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Enough => {
                eprintln!(
                    "{counted} messages from the pipeline reached the cloud ({}).",
                    summary(&per_sender)
                );
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Signal => {
                eprintln!("Stopping ({counted} messages from the pipeline reached the cloud).");
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Timeout | Outcome::StreamEnded => {
                let why = if matches!(outcome, Outcome::Timeout) {
                    format!(
                        "only {counted} of {want} messages from {FILTER_MODULE}/{SENSOR_MODULE} reached the cloud within {timeout:?}"
                    )
                } else {
                    "the cloud's message stream ended".to_owned()
                };
                eprintln!("error: {why}.\n{}", self.diagnose(&per_sender).await);
                Ok(ExitCode::from(1))
            }
        }
    }

    /// One line: which modules run (from verged).
    pub(super) async fn status_line(&self) -> String {
        match self.mgmt().modules().await {
            Ok(ms) if ms.is_empty() => "no modules yet".to_owned(),
            Ok(ms) => ms
                .iter()
                .map(|m| format!("{} {}", m.name, m.status.runtime_status.status))
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => "verged not answering".to_owned(),
        }
    }

    /// What went wrong, as far as the quickstart can tell.
    pub(super) async fn diagnose(&mut self, per_sender: &BTreeMap<String, u64>) -> String {
        let mut out = String::from("Diagnosis:\n");
        let l = &self.lay;
        if let Some(c) = self.cloud.as_mut()
            && let Ok(Some(s)) = c.try_wait()
        {
            out.push_str(&format!(
                "  × verge-cloud exited ({s}); see {}\n",
                l.logs.join("verge-cloud.log").display()
            ));
        }
        if let Some(c) = self.verged.as_mut()
            && let Ok(Some(s)) = c.try_wait()
        {
            out.push_str(&format!(
                "  × verged exited ({s}); see {}\n",
                l.logs.join("verged.log").display()
            ));
        }
        match self.mgmt().modules().await {
            Ok(ms) => {
                for want in ["edgeAgent", "edgeHub", SENSOR_MODULE, FILTER_MODULE] {
                    let found = ms.iter().find(|m| m.name == want);
                    match found {
                        Some(m) => {
                            let st = &m.status.runtime_status.status;
                            let mark = if st == "running" { "✓" } else { "×" };
                            out.push_str(&format!("  {mark} {want}: {st}\n"));
                        }
                        None if want == "edgeAgent" => {}
                        None => out.push_str(&format!(
                            "  × {want}: not created (the agent's log is in {}; its reported state in {})\n",
                            l.logs.join("verged.log").display(),
                            l.agent_storage.join("reported.json").display()
                        )),
                    }
                }
            }
            Err(e) => out.push_str(&format!("  × verged's management API: {e:#}\n")),
        }
        if per_sender.is_empty() {
            out.push_str(
                "  × the cloud received no message at all: is the hub's upstream link up? \
                 (look for `upstream` in the hub's log)\n",
            );
        } else {
            out.push_str(&format!(
                "  · the cloud received: {}\n",
                summary(per_sender)
            ));
        }
        if self.docker.is_some() {
            out.push_str(&format!(
                "  the modules' logs: verge --config {} logs <module>\n",
                l.config.display()
            ));
        }
        for m in ["edgeHub", SENSOR_MODULE, FILTER_MODULE] {
            let log = module_log(&l.homedir, m);
            let tail = last_lines(&log, 3);
            if !tail.is_empty() {
                out.push_str(&format!("  {m}'s log ({}) ends:\n", log.display()));
                for line in tail {
                    out.push_str(&format!("      {line}\n"));
                }
            }
        }
        out.push_str(&format!(
            "  verged and the agent: {}; the cloud: {}",
            l.logs.join("verged.log").display(),
            l.logs.join("verge-cloud.log").display()
        ));
        out
    }
}

pub(super) enum Outcome {
    Enough,
    Timeout,
    Signal,
    StreamEnded,
}

pub(super) fn summary(per_sender: &BTreeMap<String, u64>) -> String {
    per_sender
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A module's output under verged's process runtime (state dir `<homedir>/modules`).
pub(super) fn module_log(homedir: &Path, module: &str) -> PathBuf {
    homedir
        .join("modules/modules")
        .join(module)
        .join("logs/output.log")
}

/// The last `n` lines of a file, without ANSI colour codes (empty if unreadable).
pub(super) fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| strip_ansi(l))
        .collect()
}

pub(super) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip to the end of the CSI sequence (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(
            strip_ansi("\x1b[2mtime\x1b[0m \x1b[32m INFO\x1b[0m x"),
            "time  INFO x"
        );
    }
}
