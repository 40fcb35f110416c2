//! Devices on verge-cloud over AMQP (#22 item 3) and MQTT over WebSocket,
//! with clients nobody here wrote (scripts: `python/amqp_device.py`,
//! `python/mqtt_ws_x509.py`): Apache Qpid Proton on AMQPS
//! (`amqps_listen`) sends telemetry that lands in the D2C log with its
//! properties and takes a C2D message whose acceptance the cloud's feedback
//! reports as completed; Microsoft's uamqp sends telemetry over AMQP on the
//! HTTPS port's WebSocket; an X.509 device sends over AMQPS with only its
//! certificate (no token), and a certificate the cloud does not know is
//! refused; the same X.509 device connects over MQTT over WebSocket (paho)
//! with only its certificate. All reach the same backend as MQTT devices.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use verge_core::{SasToken, SharedAccessKey};
use verge_testkit::cloud::{CloudProc, Config};

const DEVICE: &str = "amqp-dev";

struct Cloud {
    proc: CloudProc,
    dir: tempfile::TempDir,
    https: u16,
    amqps: u16,
    policy: SharedAccessKey,
    http: reqwest::Client,
}

impl Cloud {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy = SharedAccessKey::from_bytes(vec![7u8; 32]);
        let proc = CloudProc::start(
            Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
            &Config::new(&dir.path().join("data"))
                .amqps_listen("127.0.0.1:0")
                .hostname("localhost")
                .policy_key(&policy.to_base64())
                .extra("[dps]\nenabled = false\n")
                .render(),
            dir.path(),
            "info",
        );
        let (https, amqps) = (proc.https_port(), proc.amqps_port());
        let ca = std::fs::read(dir.path().join("data/tls/ca.pem")).unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .build()
            .unwrap();
        Self {
            proc,
            dir,
            https,
            amqps,
            policy,
            http,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let token = SasToken::sign(
            "localhost",
            &self.policy,
            4_000_000_000,
            Some("iothubowner"),
        );
        let mut r = self
            .http
            .request(method, format!("https://localhost:{}{path}", self.https))
            .header("Authorization", token.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Runs `script` (under tests/python) with `python`, its params and
    /// `mode`; asserts ALL PASS.
    fn run(
        &self,
        python: &std::path::Path,
        script: &str,
        mode: &str,
        key: &str,
        extra: Value,
    ) -> String {
        let mut params = json!({
            "host": "localhost",
            "device": DEVICE,
            "key": key,
            "ca": self.dir.path().join("data/tls/ca.pem"),
            "amqps_port": self.amqps,
            "https_port": self.https,
            // The SAS signer the hub's interop scripts use.
            "sas_dir": PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hub/tests/python"),
        });
        if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        let path = self.dir.path().join(format!("{mode}.json"));
        std::fs::write(&path, params.to_string()).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let (status, stdout, stderr) = verge_testkit::run_bounded(
            Command::new(python).arg(&script).arg(&path).arg(mode),
            Duration::from_secs(120),
        );
        assert!(
            status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS"),
            "{mode} failed (status {status:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- cloud log\n{}",
            self.proc.log()
        );
        stdout
    }

    /// `amqp_device.py <mode>`.
    fn script(&self, python: &std::path::Path, mode: &str, key: &str, extra: Value) -> String {
        self.run(python, "amqp_device.py", mode, key, extra)
    }

    /// The D2C log's entries from `DEVICE`.
    async fn d2c(&self) -> Vec<Value> {
        self.d2c_of(DEVICE).await
    }

    /// The D2C log's entries from `device`.
    async fn d2c_of(&self, device: &str) -> Vec<Value> {
        let token = SasToken::sign(
            "localhost",
            &self.policy,
            4_000_000_000,
            Some("iothubowner"),
        );
        let r = self
            .http
            .get(format!(
                "https://localhost:{}/verge/messages?from=0",
                self.https
            ))
            .header("Authorization", token.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text()
            .await
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["deviceId"] == device)
            .collect()
    }
}

fn body_of(m: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(m["body"].as_str().unwrap_or(""))
        .unwrap_or_default()
}

#[test]
fn amqp_devices_send_telemetry_and_take_c2d() {
    let proton = verge_testkit::proton_python();
    let uamqp = verge_testkit::azure_python("uamqp");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cloud = Cloud::start();
    let key = SharedAccessKey::from_bytes(vec![9u8; 32]).to_base64();
    let device = json!({"deviceId": DEVICE, "authentication": {"type": "sas",
        "symmetricKey": {"primaryKey": key, "secondaryKey": key}}});
    let (s, v) = rt.block_on(cloud.call(
        reqwest::Method::PUT,
        &format!("/devices/{DEVICE}?api-version=2021-04-12"),
        &[("Content-Type", "application/json")],
        Some(device.to_string().into_bytes()),
    ));
    assert_eq!(s, 200, "{v}");
    // A C2D message waiting for the device, with full feedback.
    let (s, v) = rt.block_on(cloud.call(
        reqwest::Method::POST,
        &format!("/verge/devices/{DEVICE}/messages/deviceBound"),
        &[
            ("iothub-messageid", "c2d-1"),
            ("iothub-ack", "full"),
            ("verge-app-properties", "kind=greeting"),
        ],
        Some(b"to-the-device".to_vec()),
    ));
    assert!((200..300).contains(&s), "{s} {v}");

    // The service API (and `verge cloud devices list`) shows the protocol
    // of each identity's last connection.
    let protocol = |id: &str| {
        let (s, v) = rt.block_on(cloud.call(
            reqwest::Method::GET,
            &format!("/devices/{id}?api-version=2021-04-12"),
            &[],
            None,
        ));
        assert_eq!(s, 200, "{v}");
        v["connectionProtocol"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(protocol(DEVICE), "", "never connected");
    println!("{}", cloud.script(&proton, "proton", &key, json!({})));
    assert_eq!(protocol(DEVICE), "AMQP");
    println!("{}", cloud.script(&uamqp, "uamqp-ws", &key, json!({})));
    assert_eq!(protocol(DEVICE), "AMQP_WS");
    // An X.509 device: its certificate authenticates it, no token.
    let certs = cloud.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mine = verge_testkit::x509::leaf("amqp-x509", None, false, (-1, 30));
    let stranger = verge_testkit::x509::leaf("amqp-x509", None, false, (-1, 30));
    let thumb = verge_x509::thumbprints(&mine.der).1;
    let device = json!({"deviceId": "amqp-x509", "authentication": {"type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": thumb, "secondaryThumbprint": thumb}}});
    let (s, v) = rt.block_on(cloud.call(
        reqwest::Method::PUT,
        "/devices/amqp-x509?api-version=2021-04-12",
        &[("Content-Type", "application/json")],
        Some(device.to_string().into_bytes()),
    ));
    assert_eq!(s, 200, "{v}");
    let extra = json!({
        "x509_device": "amqp-x509",
        "x509": mine.write(&certs, "mine"),
        "stranger": stranger.write(&certs, "stranger"),
    });
    println!(
        "{}",
        cloud.script(&proton, "proton-x509", &key, extra.clone())
    );
    assert_eq!(protocol("amqp-x509"), "AMQP");
    // The same device over MQTT over WebSocket: the HTTPS connection's
    // certificate authenticates it (before, the chain never reached CONNECT).
    let paho = verge_testkit::azure_python("paho.mqtt.client");
    println!("{}", cloud.run(&paho, "mqtt_ws_x509.py", "", &key, extra));
    assert_eq!(protocol("amqp-x509"), "MQTT_WS");
    let d2c = rt.block_on(cloud.d2c());
    let amqps = d2c
        .iter()
        .find(|m| body_of(m) == b"over-amqps")
        .unwrap_or_else(|| panic!("AMQPS telemetry not in the D2C log: {d2c:?}"));
    assert_eq!(amqps["properties"]["site"], "lab", "{amqps}");
    let ws = d2c
        .iter()
        .find(|m| body_of(m) == b"\x00over-ws\xff")
        .unwrap_or_else(|| panic!("AMQP/WebSocket telemetry not in the D2C log: {d2c:?}"));
    assert_eq!(ws["properties"]["site"], "ws", "{ws}");
    let all = rt.block_on(cloud.d2c_of("amqp-x509"));
    let x509 = all
        .iter()
        .find(|m| body_of(m) == b"over-amqps-x509")
        .unwrap_or_else(|| panic!("X.509 telemetry not in the D2C log: {all:?}"));
    assert_eq!(x509["properties"]["auth"], "x509", "{x509}");
    let ws = all
        .iter()
        .find(|m| body_of(m) == b"over-mqtt-ws-x509")
        .unwrap_or_else(|| panic!("X.509 MQTT/WebSocket telemetry not in the D2C log: {all:?}"));
    assert_eq!(ws["properties"]["auth"], "x509-ws", "{ws}");
    assert!(
        !all.iter().any(|m| body_of(m) == b"must-not-arrive"),
        "a refused certificate's message arrived: {all:?}"
    );
    // The accepted C2D message is completed: its feedback says so.
    let mut feedback = String::new();
    for _ in 0..50 {
        let (_, f) =
            rt.block_on(cloud.call(reqwest::Method::GET, "/verge/feedback?from=0", &[], None));
        feedback = f.to_string();
        if feedback.contains("c2d-1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        feedback.contains("c2d-1") && feedback.contains("Success"),
        "{feedback}"
    );
}
