//! Interop with the official Azure IoT Hub service SDK for Python
//! (azure-iot-hub 2.7.0) against the real `verge-cloud` binary on
//! 127.0.0.1 (port 0; the SDK takes `HostName=127.0.0.1:PORT`), trusting the
//! generated CA through `REQUESTS_CA_BUNDLE`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let cfg = dir.path().join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmqtt_listen = \"127.0.0.1:0\"\n[service]\npolicy_key = \"{key}\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("cloud.log")).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_verge-cloud"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The binary prints its bound address once it serves.
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on https://") {
                let _ = tx.send(a.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("verge-cloud did not report its address");
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
    let cloud_log = std::fs::read_to_string(dir.path().join("cloud.log")).unwrap_or_default();
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
    let pid = child.0.id();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "verge-cloud ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
