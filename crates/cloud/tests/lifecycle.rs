//! The verge-cloud executable's life: SIGTERM and SIGINT run its shutdown
//! (listeners stopped, state closed) and exit 0; its data is private.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A daemon executable started for real, and the lines of its log.
struct Running {
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
    fn start(cmd: &mut Command) -> Self {
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

    /// Waits (bounded) for a log line containing `text`.
    fn wait_for(&mut self, text: &str) {
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
    fn stop(&mut self, signal: &str, limit: Duration) -> Option<i32> {
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

    fn logged(&self, text: &str) -> bool {
        self.log.iter().any(|l| l.contains(text))
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn start(dir: &Path) -> Running {
    let data = dir.join("data");
    let cfg = dir.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmqtt_listen = \"127.0.0.1:0\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let mut cloud = Running::start(
        Command::new(env!("CARGO_BIN_EXE_verge-cloud"))
            .arg("--config")
            .arg(&cfg),
    );
    cloud.wait_for("listening on https://");
    cloud
}

#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cloud = start(dir.path());
        assert_eq!(cloud.stop(signal, Duration::from_secs(15)), Some(0));
        assert!(
            cloud.logged("verge-cloud stopped"),
            "{}",
            cloud.log.join("\n")
        );
    }
}

/// The database (whose journal holds device keys) and every other file in
/// the data directory are the owner's only.
#[test]
fn data_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cloud = start(dir.path());
    assert_eq!(cloud.stop("TERM", Duration::from_secs(15)), Some(0));
    assert_eq!(mode(&data), 0o700);
    let mut seen = 0;
    let mut stack = vec![data];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = mode(&p);
            if p.is_dir() {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
                stack.push(p);
            } else {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 3, "only {seen} files");
}
