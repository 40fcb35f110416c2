//! The verge-agent executable's Prometheus endpoint, scraped and stored by
//! a real Prometheus server: module starts counted with the manifest's
//! version, and the running-time gauges telling a module that runs from one
//! desired running that exited. `VERGE_SKIP_PROMETHEUS_TESTS=1` skips it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use verge_testkit::Running;
use verge_testkit::net::free_port;
use verge_testkit::prometheus::{Prometheus, value};

/// A module running `sh -c <script>` (process backend).
fn sh(script: &str, version: &str, policy: &str) -> Value {
    json!({
        "version": version, "type": "docker", "status": "running", "restartPolicy": policy,
        "settings": { "image": "/bin/sh", "createOptions": json!({ "Cmd": ["-c", script] }).to_string() }
    })
}

#[test]
fn prometheus_scrapes_the_agents_series() {
    if Prometheus::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let doc = json!({ "modulesContent": {
        "$edgeAgent": { "properties.desired": {
            "schemaVersion": "1.1",
            "runtime": { "type": "docker", "settings": {} },
            "systemModules": {
                "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent" } },
                "edgeHub": sh("exec sleep 60", "1.0", "always")
            },
            "modules": {
                "steady": sh("exec sleep 60", "1.2", "always"),
                "quitter": sh("exit 3", "0.9", "never")
            }
        }},
        "$edgeHub": { "properties.desired": { "schemaVersion": "1.1", "routes": {} } }
    }});
    std::fs::write(&manifest, doc.to_string()).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent = Running::start(
        Command::new(env!("CARGO_BIN_EXE_verge-agent"))
            .arg("--storage")
            .arg(dir.path().join("storage"))
            .arg("--state-dir")
            .arg(dir.path().join("modules"))
            .arg("--manifest")
            .arg(&manifest)
            .args(["--runtime", "process", "--no-twin", "--interval-ms", "200"])
            .arg("--metrics-listen")
            .arg(addr.to_string())
            .env_remove("IOTEDGE_MANAGEMENTURI")
            .env_remove("MetricsEnabled")
            .env("IOTEDGE_IOTHUBHOSTNAME", "hub.example")
            .env("IOTEDGE_DEVICEID", "edge1"),
    );
    agent.wait_for("serving metrics");
    let prom = Prometheus::start("edgeagent", &[addr]);
    prom.wait_value(r#"up{job="edgeagent"}"#, 1.0);
    let labels = prom.wait_value(
        r#"edgeAgent_module_start_total{module_name="steady",module_version="1.2"}"#,
        1.0,
    );
    assert_eq!(labels["iothub"], "hub.example");
    assert_eq!(labels["edge_device"], "edge1");
    assert_eq!(labels["instance_number"].as_str().unwrap().len(), 36);
    prom.wait_value(
        r#"edgeAgent_module_start_total{module_name="quitter",module_version="0.9"}"#,
        1.0,
    );
    // Both are expected to run; only `steady` does.
    prom.wait_any(r#"edgeAgent_total_time_running_correctly_seconds{module_name="steady"} > 2"#);
    prom.wait_any(r#"edgeAgent_total_time_expected_running_seconds{module_name="quitter"} > 2"#);
    let quitter =
        prom.query(r#"edgeAgent_total_time_running_correctly_seconds{module_name="quitter"}"#);
    let ran = value(&quitter[0]).unwrap();
    let expected = value(
        &prom.query(r#"edgeAgent_total_time_expected_running_seconds{module_name="quitter"}"#)[0],
    )
    .unwrap();
    // It ran for at most the one pass that started it.
    assert!(
        ran < 1.0 && expected > 2.0,
        "quitter: ran {ran} s of {expected} s"
    );
    prom.wait_any(r#"edgeAgent_command_latency_seconds{command="start"} >= 0"#);
    // The endpoint ends with the agent.
    assert_eq!(agent.stop("TERM", Duration::from_secs(15)), Some(0));
    assert!(std::net::TcpStream::connect(addr).is_err());
}
