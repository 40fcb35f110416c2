//! Interop with the official Azure IoT Python SDK (azure-iot-device 2.14.0)
//! against the real `verge-hub` binary on 127.0.0.1:8883 (the SDK's fixed port).
//! All scenarios run in sequence in this one test, so only one hub binds 8883.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> PathBuf {
    let p = std::env::var_os("VERGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    let ok = Command::new(&p)
        .args(["-c", "import azure.iot.device"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with azure-iot-device at {} (set VERGE_PYTHON, or create it with \
         `python3 -m venv /work/main/.venv && /work/main/.venv/bin/pip install azure-iot-device==2.14.0`)",
        p.display()
    );
    p
}

fn wait_port_free(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} stays busy; cannot run the SDK interop test"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn azure_python_sdk_interop() {
    let python = python();
    wait_port_free(8883);
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let _cfg = config(&pki, storage.path(), "127.0.0.1:8883", "127.0.0.1:0");
    let log = std::fs::File::create(pki.dir.path().join("hub.log")).unwrap();
    let hub = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_verge-hub"))
            .arg("--config")
            .arg(pki.dir.path().join("hub.toml"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", 8883)).is_err() {
        assert!(Instant::now() < deadline, "hub did not start listening");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ca = pki.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let params = serde_json::json!({
        "hub": HUB,
        "device": DEVICE,
        "ca": ca,
        "twins_file": pki.dir.path().join("twins.json"),
        "keys": {
            "modA": module_key("modA").to_base64(),
            "modB": module_key("modB").to_base64(),
            "leaf1": LEAF_KEY,
            "bad": "YmFkLWtleS1iYWQta2V5LWJhZC1rZXk=",
        }
    });
    let params_path = pki.dir.path().join("params.json");
    std::fs::write(&params_path, params.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/interop.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(&params_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    drop(hub);
    let hub_log = std::fs::read_to_string(pki.dir.path().join("hub.log")).unwrap_or_default();
    let ok = status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS");
    assert!(
        ok,
        "interop failed (status {status:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- hub log (tail)\n{}",
        tail(&stderr, 60),
        tail(&hub_log, 60)
    );
    println!("{stdout}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
