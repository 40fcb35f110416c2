//! The verged executable's life: SIGTERM and SIGINT run its shutdown (the
//! agent it supervises is stopped first) and exit 0.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead as _, BufReader};
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

const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";

#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let agent = dir.path().join("agent.sh");
        std::fs::write(&agent, "exec sleep 600\n").unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"hostname = "edge1.local"
homedir = "{home}"

[provisioning]
source = "manual"
connection_string = "HostName=hub.example.net;DeviceId=dev1;SharedAccessKey={KEY}"

[agent]
name = "edgeAgent"
type = "process"
[agent.config]
image = "/bin/sh {agent}"
"#,
                home = home.display(),
                agent = agent.display(),
            ),
        )
        .unwrap();
        let mut verged = Running::start(
            Command::new(env!("CARGO_BIN_EXE_verged"))
                .arg("--config")
                .arg(&cfg),
        );
        verged.wait_for("agent started");
        assert_eq!(verged.stop(signal, Duration::from_secs(20)), Some(0));
        assert!(verged.logged("agent stopped"), "{}", verged.log.join("\n"));
        assert!(verged.logged("stop requested"), "{}", verged.log.join("\n"));
    }
}
