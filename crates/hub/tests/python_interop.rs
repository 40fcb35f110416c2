//! Interop with the official Azure IoT Python SDK (azure-iot-device 2.14.0)
//! against the real `verge-hub` binary on the SDK's fixed ports: 8883 for
//! MQTT, 443 for MQTT over WebSocket and the HTTPS method API. Each test owns
//! one fixed port (scenarios run in sequence inside it), so the two tests can
//! run in parallel.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python with the official SDK (`VERGE_PYTHON`, else the repository's .venv).
fn python() -> PathBuf {
    verge_testkit::azure_python("azure.iot.device")
}

/// Starts the hub binary with `mqtt`/`https` listen addresses, waits for
/// `ready_port`, runs `script` with the usual parameters and asserts it
/// printed ALL PASS.
fn run_scenarios(script: &str, mqtt: &str, https: &str, ready_port: u16) {
    let python = python();
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let _cfg = config(&pki, storage.path(), mqtt, https);
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
    while std::net::TcpStream::connect(("127.0.0.1", ready_port)).is_err() {
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
    let (status, stdout, stderr) = run_interop_script(&python, script, &params, pki.dir.path());
    drop(hub);
    let hub_log = std::fs::read_to_string(pki.dir.path().join("hub.log")).unwrap_or_default();
    let ok = status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS");
    assert!(
        ok,
        "interop failed (status {status:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- hub log (tail)\n{}",
        tail(&stderr, 60),
        tail(&hub_log, 60)
    );
    // The log is a file, not a terminal: plain text, no colour codes.
    assert!(
        hub_log.contains("client connected") && !hub_log.contains('\x1b'),
        "hub log has no connections or has escape codes:\n{}",
        tail(&hub_log, 20)
    );
    println!("{stdout}");
}

#[test]
fn azure_python_sdk_interop() {
    assert!(
        verge_testkit::port_free_within(8883, Duration::from_secs(60)),
        "port 8883 stays busy; cannot run the SDK interop test"
    );
    run_scenarios("interop.py", "127.0.0.1:8883", "127.0.0.1:0", 8883);
}

/// MQTT over WebSocket and module-to-module `invoke_method`: the SDK always
/// dials port 443 for both (no option to change it), so the hub must own
/// 127.0.0.1:443 (tests run as root). Skipped, saying so, only when 443
/// cannot be bound.
#[test]
fn azure_python_sdk_websocket_and_methods_on_443() {
    if !verge_testkit::port_free_within(443, Duration::from_secs(30)) {
        eprintln!(
            "SKIPPED azure_python_sdk_websocket_and_methods_on_443: cannot bind 127.0.0.1:443 \
             (not root, or the port is in use); the SDK only ever dials 443 for these"
        );
        return;
    }
    run_scenarios("interop_ws.py", "127.0.0.1:0", "127.0.0.1:443", 443);
}
