//! Test support shared by Verge's integration tests (dev-dependency only):
//! a daemon executable started for real, with its log lines collected, a
//! bounded wait for a line, and a stop by signal with a bounded wait for the
//! exit; sibling binaries built with the test's own cargo, target directory
//! and profile; the Python with the official Azure SDKs, and the port the
//! device SDKs dial; verged's config file and its start; verge-cloud's
//! config file and its start, with the addresses it printed. Panics are the
//! point here: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::panic)]

pub mod cloud;
pub mod docker;
pub mod net;
pub mod prometheus;
pub mod registry;
pub mod verged;
pub mod x509;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Sends `signal` (`TERM`, `INT`, …) to `child` with `kill`, as an operator
/// would; whether `kill` succeeded.
pub fn send_signal(child: &Child, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits up to `limit` for `child` to exit: its status, or `None` while it
/// still runs.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon executable started for real, and the lines of its log (stdout
/// and stderr). Killed when dropped, so a failing test leaves nothing behind.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `cmd` with text logs at `info`, collecting both output streams.
    pub fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("VERGE_LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 30 s) for a log line containing `text`.
    pub fn wait_for(&mut self, text: &str) {
        self.wait_for_with(text, String::new);
    }

    /// [`wait_for`](Self::wait_for), adding `context()` (e.g. another
    /// process's log) to the failure.
    pub fn wait_for_with(&mut self, text: &str, context: impl FnOnce() -> String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.log.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no log line with {text:?}; log:\n{}\n{}",
            self.log.join("\n"),
            context()
        );
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to `limit` for the exit;
    /// returns the exit code (`None`: killed by a signal).
    pub fn stop(&mut self, signal: &str, limit: Duration) -> Option<i32> {
        assert!(send_signal(&self.child, signal), "kill -{signal} failed");
        let Some(status) = wait_exit(&mut self.child, limit) else {
            panic!(
                "no exit within {limit:?} of SIG{signal}; log:\n{}",
                self.log.join("\n")
            );
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        status.code()
    }

    /// Whether a line seen so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.iter().any(|l| l.contains(text))
    }

    /// The lines seen so far.
    pub fn log(&self) -> &[String] {
        &self.log
    }
}

// The official Azure SDKs in Python, for interop tests.
mod sdk;
pub use sdk::{azure_python, port_free_within, proton_python, run_bounded};

/// `<target>/<profile>` of this test binary (it runs from `<target>/<profile>/deps/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds `packages` (`-p` each) and returns the profile directory holding
/// their binaries.
pub fn build(packages: &[&str]) -> PathBuf {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().unwrap().to_path_buf();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut cmd = Command::new(env!("CARGO"));
    // Without what `cargo test` set for this test (CARGO_PKG_*, OUT_DIR, …):
    // build scripts that watch them (ring's) would run again, and all that
    // depends on them would be compiled again, on every test run and again
    // by the next `cargo build` from a shell.
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ]
        .contains(&name.as_ref())
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(&k);
        }
    }
    cmd.args(["build", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd.arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(1200) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("building {packages:?} took more than 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "building {packages:?} failed: {status}");
    profile_dir
}

/// Appends `toml` to a config's extra sections, ending in a newline (the config builders' `extra`).
fn push_toml(buf: &mut String, toml: &str) {
    buf.push_str(toml);
    if !buf.is_empty() && !buf.ends_with('\n') {
        buf.push('\n');
    }
}

/// Runs `cmd` and returns its stdout; panics with its output when it fails.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
