//! Interop of verge-cloud's device endpoint with the official Azure IoT
//! device SDK for Python (azure-iot-device 2.14.0), checked through the
//! official service SDK (azure-iot-hub 2.7.0), against the real binary.
//! The device SDK can only dial port 8883 (no option to change it), so the
//! cloud's MQTT listener must own 127.0.0.1:8883; the test waits for the
//! port (verge-hub's interop test uses it too) and is skipped, saying so,
//! only when it cannot be bound.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use verge_testkit::cloud::{CloudProc, Config};

/// The Python with the official SDK (`VERGE_PYTHON`, else the repository's .venv).
fn python() -> PathBuf {
    verge_testkit::azure_python("azure.iot.device, azure.iot.hub")
}

#[test]
fn azure_python_device_sdk_interop() {
    let python = python();
    assert!(
        verge_testkit::port_free_within(8883, Duration::from_secs(90)),
        "127.0.0.1:8883 (the only port the Azure device SDK dials) stayed taken: another test or a broker holds it"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let cloud = CloudProc::start(
        Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
        &Config::new(&data)
            .mqtt_listen("127.0.0.1:8883")
            .policy_key(&key)
            .render(),
        dir.path(),
        "info,verge_cloud::device=debug",
    );
    assert_eq!(cloud.mqtts(), "127.0.0.1:8883");
    let https = cloud.https();
    let cs = format!("HostName={https};SharedAccessKeyName=iothubowner;SharedAccessKey={key}");
    let ca = data.join("tls/ca.pem");
    let params = serde_json::json!({
        "service_connection_string": cs,
        "device_host": "127.0.0.1",
        "ca": ca,
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/device_sdk.py");
    let started = Instant::now();
    let mut py = Command::new(&python)
        .arg(&script)
        .arg(params.to_string())
        .env("REQUESTS_CA_BUNDLE", &ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = py.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = py.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = py.wait_with_output().unwrap();
    let cloud_log = cloud.log();
    drop(cloud);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS"),
        "device SDK script failed (status {status:?}) after {:?}\n--- stdout\n{stdout}\n\
         --- stderr\n{}\n--- verge-cloud log (tail)\n{}",
        started.elapsed(),
        tail(&stderr, 60),
        tail(&cloud_log, 60)
    );
    println!("{stdout}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
