//! The verge-hub executable's life: it starts over damaged side files
//! (moving them aside), keeps its storage private, and stops cleanly on
//! SIGTERM as on SIGINT.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running verge-hub and the lines of its log.
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
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_verge-hub"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("VERGE_LOG_FORMAT", "text")
            .env_remove("IOTEDGE_WORKLOADURI")
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
        let deadline = Instant::now() + Duration::from_secs(20);
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

    /// Sends `signal` and waits (bounded) for the exit; returns its code.
    fn stop(&mut self, signal: &str) -> Option<i32> {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        // The hub's grace period is 5 s; allow for a slow machine.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "verge-hub did not exit on {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn write_config(pki: &common::Pki, storage: &Path) -> std::path::PathBuf {
    common::config(pki, storage, "127.0.0.1:0", "127.0.0.1:0");
    pki.dir.path().join("hub.toml")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn damaged(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{name}.damaged-")))
        .collect()
}

/// SIGTERM (what docker stop and verged send) runs the shutdown and exits
/// 0, as SIGINT does. Before the fix SIGTERM killed the hub outright.
#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let pki = common::pki();
        let storage = pki.dir.path().join("storage");
        let config = write_config(&pki, &storage);
        let mut hub = Running::start(&config);
        hub.wait_for("verge-hub listening");
        assert_eq!(hub.stop(signal), Some(0), "{}", hub.log.join("\n"));
        assert!(
            hub.log.iter().any(|l| l.contains("verge-hub stopped")),
            "SIG{signal}: {}",
            hub.log.join("\n")
        );
    }
}

/// An empty or corrupt sessions or twins file no longer stops the hub: it is
/// moved aside with a warning naming it, and the hub starts.
#[test]
fn damaged_side_files_are_moved_aside() {
    for content in ["", "{\"edge1/modA\": [\"devices/edge1/"] {
        let pki = common::pki();
        let storage = pki.dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        std::fs::write(storage.join("sessions.json"), content).unwrap();
        std::fs::write(storage.join("twins.json"), content).unwrap();
        let config = write_config(&pki, &storage);
        let mut hub = Running::start(&config);
        hub.wait_for("verge-hub listening");
        for name in ["sessions.json", "twins.json"] {
            assert!(
                hub.log
                    .iter()
                    .any(|l| l.contains("damaged file moved aside") && l.contains(name)),
                "{name}: {}",
                hub.log.join("\n")
            );
            assert!(!storage.join(name).exists());
            assert_eq!(damaged(&storage, name).len(), 1, "{name}");
        }
        assert_eq!(hub.stop("TERM"), Some(0));
    }
}

/// The storage directory, the store inside it and the hub's side files are
/// the owner's only.
#[test]
fn storage_is_private() {
    let pki = common::pki();
    let storage = pki.dir.path().join("storage");
    // Also when the directory already existed with a wider mode.
    std::fs::create_dir_all(storage.join("store")).unwrap();
    std::fs::set_permissions(&storage, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        storage.join("store"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let config = write_config(&pki, &storage);
    let mut hub = Running::start(&config);
    hub.wait_for("verge-hub listening");
    assert_eq!(hub.stop("TERM"), Some(0));
    assert_eq!(mode(&storage), 0o700);
    assert_eq!(mode(&storage.join("store")), 0o700);
    assert_eq!(mode(&storage.join("sessions")), 0o700);
    let twins = storage.join("twins.json");
    if twins.exists() {
        assert_eq!(mode(&twins), 0o600);
    }
}
