//! A real Prometheus server (Debian's `prometheus`) for metrics tests: it
//! scrapes the given targets every second into its own temporary storage,
//! listens on a free loopback port, and is killed when dropped. Queries go
//! to its HTTP API (`/api/v1/query`) with bounded waits.
//!
//! `VERGE_SKIP_PROMETHEUS_TESTS=1` makes [`Prometheus::skip`] true (tests
//! then return early, saying so); otherwise a missing `prometheus`
//! executable fails the test.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::Running;

/// How long [`Prometheus::wait_for`] waits for a query to be satisfied.
const WAIT: Duration = Duration::from_secs(30);

/// A running Prometheus server.
pub struct Prometheus {
    run: Running,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Whether the environment asks to skip Prometheus tests (printed).
    pub fn skip() -> bool {
        let skip = std::env::var("VERGE_SKIP_PROMETHEUS_TESTS").as_deref() == Ok("1");
        if skip {
            eprintln!("VERGE_SKIP_PROMETHEUS_TESTS=1: skipped");
        }
        skip
    }

    /// Starts a server scraping `targets` (job `job`, path `/metrics`)
    /// every second; returns once it serves its API.
    pub fn start(job: &str, targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: {job}\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let api = SocketAddr::from(([127, 0, 0, 1], crate::net::free_port()));
        let mut run = Running::start(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={api}")),
        );
        run.wait_for("Server is ready to receive web requests");
        Self {
            run,
            api,
            _dir: dir,
        }
    }

    /// The instant vector `query` yields now.
    pub fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", encode(query));
        let mut s = TcpStream::connect(self.api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // HTTP/1.0: the answer is not chunked and ends with the connection.
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{query}: not JSON ({e}): {text}"));
        assert_eq!(v["status"], "success", "{query}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (at most 30 s) until `query` yields something `ok` accepts;
    /// returns it.
    pub fn wait_for(&self, query: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.query(query);
            if ok(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: not satisfied within {WAIT:?}; Prometheus has {got:?}; its log:\n{}",
                self.run.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until `query` yields exactly one series whose value is `want`;
    /// returns that series' labels.
    pub fn wait_value(&self, query: &str, want: f64) -> Map<String, Value> {
        let got = self.wait_for(query, |r| matches!(r, [one] if value(one) == Some(want)));
        got[0]["metric"].as_object().cloned().unwrap_or_default()
    }

    /// Waits until `query` (a filter such as `x > 2`) yields at least one series.
    pub fn wait_any(&self, query: &str) -> Vec<Value> {
        self.wait_for(query, |r| !r.is_empty())
    }
}

/// A series' sample value.
pub fn value(series: &Value) -> Option<f64> {
    series["value"][1].as_str()?.parse().ok()
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
