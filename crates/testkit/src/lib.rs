//! Test support shared by Verge's integration tests (dev-dependency only):
//! a daemon executable started for real, with its log lines collected, a
//! bounded wait for a line, and a stop by signal with a bounded wait for the
//! exit. Panics are the point here: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
        panic!("no log line with {text:?}; log:\n{}", self.log.join("\n"));
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to `limit` for the exit;
    /// returns the exit code (`None`: killed by a signal).
    pub fn stop(&mut self, signal: &str, limit: Duration) -> Option<i32> {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {limit:?} of SIG{signal}; log:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// The Python that has the official Azure IoT SDKs: `VERGE_PYTHON`, else
/// the repository's `.venv` (what `scripts/test.sh` installs). Panics, with
/// how to get one, unless `import {modules}` works there.
pub fn azure_python(modules: &str) -> PathBuf {
    let p = std::env::var_os("VERGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    let ok = Command::new(&p)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with {modules} at {} (set VERGE_PYTHON, or run scripts/test.sh)",
        p.display()
    );
    p
}

/// True once 127.0.0.1:`port` can be bound, waiting up to `wait` (for
/// another test that owns a fixed port the Azure SDKs dial).
pub fn port_free_within(port: u16, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `cmd` to its end, killing it after `limit`: its exit status
/// (`None`: killed), stdout and stderr.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while it runs, so a chatty child cannot block on a full one.
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = readers.into_iter().map(|h| h.join().unwrap_or_default());
    let stdout = out.next().unwrap_or_default();
    let stderr = out.next().unwrap_or_default();
    (status, stdout, stderr)
}
