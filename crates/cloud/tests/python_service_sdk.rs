//! Interop with the official Azure IoT Hub service SDK for Python
//! (azure-iot-hub 2.7.0) against the real `verge-cloud` binary on
//! 127.0.0.1 (port 0; the SDK takes `HostName=127.0.0.1:PORT`), trusting the
//! generated CA through `REQUESTS_CA_BUNDLE`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use verge_testkit::cloud::{CloudProc, Config};

/// The Python with the official SDK (`VERGE_PYTHON`, else the repository's .venv).
fn python() -> PathBuf {
    verge_testkit::azure_python("azure.iot.hub")
}

#[test]
fn azure_python_service_sdk_interop() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let mut cloud = CloudProc::start(
        Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
        &Config::new(&data).policy_key(&key).render(),
        dir.path(),
        "info",
    );
    let addr = cloud.https();
    let cs = format!("HostName={addr};SharedAccessKeyName=iothubowner;SharedAccessKey={key}");
    let bad_key = base64::engine::general_purpose::STANDARD.encode([8u8; 32]);
    let bad_cs =
        format!("HostName={addr};SharedAccessKeyName=iothubowner;SharedAccessKey={bad_key}");
    let params = serde_json::json!({ "connection_string": cs, "bad_connection_string": bad_cs });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/service_sdk.py");
    let started = Instant::now();
    let out = Command::new(&python)
        .arg(&script)
        .arg(params.to_string())
        .env("REQUESTS_CA_BUNDLE", data.join("tls/ca.pem"))
        .output()
        .unwrap();
    let cloud_log = cloud.log();
    assert!(
        out.status.success(),
        "SDK script failed after {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- verge-cloud log\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cloud_log
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    // SIGTERM: clean shutdown with exit code 0.
    cloud.stop_term(Duration::from_secs(20));
}
