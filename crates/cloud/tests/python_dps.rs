//! Interop of verge-cloud's DPS with the official Azure IoT device SDK for
//! Python (azure-iot-device 2.14.0: `ProvisioningDeviceClient` over MQTT,
//! then `IoTHubDeviceClient` with the assignment) and with the DPS HTTPS
//! protocol as aziot-identityd speaks it, checked through azure-iot-hub
//! 2.7.0 and the DPS service API (tests/python/dps_sdk.py); symmetric keys
//! and X.509 (`create_from_x509_certificate`, certificates made here). The SDKs only
//! dial port 8883, so the cloud must own 127.0.0.1:8883; the test waits for
//! it (other interop tests use it too) and is skipped, saying so, only when
//! it cannot be bound.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use verge_testkit::cloud::{CloudProc, Config};
use verge_testkit::x509;

#[test]
fn azure_python_provisioning_client_interop() {
    let python = verge_testkit::azure_python("azure.iot.device, azure.iot.hub");
    assert!(
        verge_testkit::port_free_within(8883, Duration::from_secs(120)),
        "127.0.0.1:8883 (the only port the Azure device SDK dials) stayed taken: another test or a broker holds it"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = base64::engine::general_purpose::STANDARD.encode([6u8; 32]);
    let mut cloud = CloudProc::start(
        Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
        &Config::new(&data)
            .mqtt_listen("127.0.0.1:8883")
            .hostname("localhost")
            .policy_key(&key)
            .extra("[dps]\nid_scope = \"0ne00TEST01\"\n")
            .render(),
        dir.path(),
        "info",
    );
    let https = cloud.https().to_owned();
    assert!(cloud.logged("dps id scope: 0ne00TEST01"), "{}", cloud.log());
    let port = https.rsplit_once(':').unwrap().1;
    let ca = data.join("tls/ca.pem");
    // X.509 attestation: a device's own certificate (individual), another
    // with the same CN (refused), and a device signed by a group's CA.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let ind = x509::leaf("x509-ind", None, false, (-1, 30));
    let stranger = x509::leaf("x509-ind", None, false, (-1, 30));
    let group_ca = x509::root("Verge DPS Test Group CA");
    let member = x509::leaf("x509-member", Some(&group_ca), false, (-1, 30));
    let params = serde_json::json!({
        "service_connection_string":
            format!("HostName=localhost:{port};SharedAccessKeyName=iothubowner;SharedAccessKey={key}"),
        "host": "localhost",
        "id_scope": "0ne00TEST01",
        "ca": ca,
        "x509": {
            "ind": ind.write(&certs, "ind"),
            "ind_pem": ind.pem,
            "stranger": stranger.write(&certs, "stranger"),
            "group_ca_pem": group_ca.pem,
            "member": member.write(&certs, "member"),
        },
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/dps_sdk.py");
    let (status, stdout, stderr) = verge_testkit::run_bounded(
        Command::new(&python)
            .arg(&script)
            .arg(params.to_string())
            .env("REQUESTS_CA_BUNDLE", &ca),
        Duration::from_secs(240),
    );
    cloud.stop("TERM", Duration::from_secs(10));
    let log = cloud.log();
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS"),
        "DPS script failed (status {status:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- verge-cloud log\n{}",
        tail(&stderr, 60),
        tail(&log, 80)
    );
    // The refusals are logged with their reason.
    assert!(log.contains("DPS CONNECT refused"), "{}", tail(&log, 80));
    println!("{stdout}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
