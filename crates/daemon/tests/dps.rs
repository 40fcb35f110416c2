//! End to end with the real `verge-cloud` and `verged` binaries: verged
//! with `[provisioning] source = "dps"` (symmetric key, group enrollment,
//! derived key; and X.509, a certificate signed by a group's CA) registers with verge-cloud's DPS over HTTPS, gets its hub
//! and device id, and works as that device (its module identities are
//! registered in the cloud with the device's key); the assignment is
//! cached, so verged starts again with the cloud down; `POST
//! /system/reprovision` registers again once the cloud is back.
//!
//! Everything binds 127.0.0.1 and temp-dir sockets; both processes are
//! killed on drop and every wait is bounded.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verge_core::sas::{SasToken, SharedAccessKey};
use verge_testkit::Running;
use verge_testkit::cloud::{self, CloudProc};
use verge_testkit::verged::Config;

const POLICY_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
const GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SCOPE: &str = "0ne00E2E";
const REG: &str = "edge-dps-1";

fn build(package: &str, bin: &str) -> PathBuf {
    verge_testkit::build(&[package]).join(bin)
}

struct Cloud {
    http: reqwest::Client,
    port: u16,
}

impl Cloud {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let host = format!("127.0.0.1:{}", self.port);
        let token = SasToken::sign(
            &host,
            &SharedAccessKey::from_base64(POLICY_KEY).unwrap(),
            4_000_000_000,
            Some("iothubowner"),
        )
        .to_string();
        let mut r = self
            .http
            .request(
                method,
                format!("https://{host}{path}?api-version=2021-10-01"),
            )
            .header("Authorization", token);
        if let Some(b) = body {
            r = r
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// The service API client of the cloud in `dir` (its generated CA trusted).
fn api(dir: &Path, port: u16) -> Cloud {
    let ca_path = dir.join("cloud/tls/ca.pem");
    let _ = rustls::crypto::ring::default_provider().install_default();
    Cloud {
        http: reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(&std::fs::read(&ca_path).unwrap()).unwrap(),
            ])
            .build()
            .unwrap(),
        port,
    }
}

/// verged's config in `dir`, provisioned by the cloud's DPS on `port` with
/// `attestation` (the `[provisioning.attestation]` lines).
fn verged_config(dir: &Path, port: u16, attestation: &str) -> PathBuf {
    Config::new(&dir.join("home"))
        .trust_bundle_cert(&dir.join("cloud/tls/ca.pem"))
        .provisioning(
            "dps",
            &format!(
                "global_endpoint = \"https://127.0.0.1:{port}/\"\nid_scope = \"{SCOPE}\"\n\
                 https_port = {port}\n[provisioning.attestation]\n{attestation}"
            ),
        )
        .agent_image("/bin/sleep 3600")
        .extra("[edge_ca]\nauto_generated_edge_ca_expiry_days = 30\n")
        .write(dir.join("config.toml"))
}

fn start_cloud(bin: &Path, dir: &Path, port: u16) -> CloudProc {
    let cfg = cloud::Config::new(&dir.join("cloud"))
        .listen(&format!("127.0.0.1:{port}"))
        .hostname("127.0.0.1")
        .policy_key(POLICY_KEY)
        .extra(&format!("[dps]\nid_scope = \"{SCOPE}\"\n"));
    CloudProc::start(bin, &cfg.render(), dir, "info")
}

#[test]
fn verged_provisioned_by_dps_then_offline_from_the_cache() {
    let cloud_bin = build("verge-cloud", "verge-cloud");
    let verged_bin = build("verge-daemon", "verged");
    let dir = tempfile::tempdir().unwrap();
    let port = verge_testkit::net::free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cloud = start_cloud(&cloud_bin, dir.path(), port);
    let api = api(dir.path(), port);
    let (s, v) = rt.block_on(api.call(
        reqwest::Method::PUT,
        "/enrollmentGroups/edges",
        Some(json!({
            "enrollmentGroupId": "edges",
            "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
            "capabilities": {"iotEdge": true},
        })),
    ));
    assert_eq!(s, 200, "{v}");

    // The device key for a group enrollment is derived, as aziot expects it.
    let key = SharedAccessKey::from_base64(GROUP_KEY)
        .unwrap()
        .derive(REG)
        .to_base64();
    let home = dir.path().join("home");
    let cfg = verged_config(
        dir.path(),
        port,
        &format!(
            "method = \"symmetric_key\"\nregistration_id = \"{REG}\"\nsymmetric_key = {{ value = \"{key}\" }}"
        ),
    );

    // First start: registers, then runs as the assigned device.
    let mut verged = Running::start(Command::new(&verged_bin).arg("--config").arg(&cfg));
    verged.wait_for("provisioned by DPS");
    verged.wait_for("module identities are registered in the cloud (online)");
    let cache: Value =
        serde_json::from_slice(&std::fs::read(home.join("dps/assignment.json")).unwrap()).unwrap();
    assert_eq!(cache["assigned_hub"], "127.0.0.1", "{cache}");
    assert_eq!(cache["device_id"], REG, "{cache}");
    let (s, dev) = rt.block_on(api.call(reqwest::Method::GET, &format!("/devices/{REG}"), None));
    assert_eq!(s, 200, "{dev}");
    assert_eq!(dev["capabilities"]["iotEdge"], true, "{dev}");
    assert_eq!(
        dev["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str(),
        "{dev}"
    );
    // verged registered its agent's identity as the device: the key works.
    let (s, m) = rt.block_on(api.call(
        reqwest::Method::GET,
        &format!("/devices/{REG}/modules/$edgeAgent"),
        None,
    ));
    assert_eq!(s, 200, "{m}");
    let (s, reg) =
        rt.block_on(api.call(reqwest::Method::GET, &format!("/registrations/{REG}"), None));
    assert_eq!(
        (s, reg["enrollmentGroupId"].as_str()),
        (200, Some("edges")),
        "{reg}"
    );
    assert_eq!(verged.stop("TERM", Duration::from_secs(30)), Some(0));

    // Cloud down: verged starts from the cached assignment.
    assert_eq!(cloud.stop("TERM", Duration::from_secs(15)), Some(0));
    let started = Instant::now();
    let mut verged = Running::start(Command::new(&verged_bin).arg("--config").arg(&cfg));
    verged.wait_for("DPS assignment from the cache");
    verged.wait_for("management API up");
    assert!(!verged.logged("registering with DPS"), "{:?}", verged.log());
    eprintln!("offline start took {:?}", started.elapsed());

    // Reprovision on demand, with the cloud back: registers again.
    let mut cloud = start_cloud(&cloud_bin, dir.path(), port);
    let mgmt = home.join("mgmt.sock");
    let r = rt
        .block_on(verge_daemon::client::request(
            &mgmt,
            "POST",
            "/system/reprovision?api-version=2022-08-03",
            Some(b"{}".to_vec()),
            Duration::from_secs(10),
        ))
        .unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("registers again with DPS"));
    verged.wait_for("registering with DPS");
    verged.wait_for("provisioned by DPS");
    verged.wait_for("management API up");
    let (s, reg) =
        rt.block_on(api.call(reqwest::Method::GET, &format!("/registrations/{REG}"), None));
    assert_eq!(s, 200, "{reg}");
    assert_eq!(reg["substatus"], "deviceDataMigrated", "{reg}");
    assert_eq!(verged.stop("TERM", Duration::from_secs(30)), Some(0));
    assert_eq!(cloud.stop("TERM", Duration::from_secs(15)), Some(0));
}

/// verged with `attestation.method = "x509"` (#23 item 4): a device
/// certificate signed by an X.509 enrollment group's CA, no registration id
/// (aziot's default: the certificate's CN). verged registers with the
/// certificate, the device is created in the cloud for that certificate,
/// and verged registers its module identities presenting it.
#[test]
fn verged_provisioned_by_dps_with_an_x509_certificate() {
    let cloud_bin = build("verge-cloud", "verge-cloud");
    let verged_bin = build("verge-daemon", "verged");
    let dir = tempfile::tempdir().unwrap();
    let port = verge_testkit::net::free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cloud = start_cloud(&cloud_bin, dir.path(), port);
    let api = api(dir.path(), port);
    let ca = verge_testkit::x509::root("Verge Edge Fleet CA");
    let (s, v) = rt.block_on(api.call(
        reqwest::Method::PUT,
        "/enrollmentGroups/x509-edges",
        Some(json!({
            "enrollmentGroupId": "x509-edges",
            "attestation": {"type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": ca.pem}}}},
            "capabilities": {"iotEdge": true},
        })),
    ));
    assert_eq!(s, 200, "{v}");
    let device = verge_testkit::x509::leaf("edge-x509-1", Some(&ca), false, (-1, 30));
    let [cert, key] = device.write(dir.path(), "edge-x509-1");
    let cfg = verged_config(
        dir.path(),
        port,
        &format!(
            "method = \"x509\"\nidentity_cert = \"file://{}\"\nidentity_pk = \"file://{}\"",
            cert.display(),
            key.display()
        ),
    );
    let mut verged = Running::start(Command::new(&verged_bin).arg("--config").arg(&cfg));
    verged.wait_for("provisioned by DPS");
    verged.wait_for("module identities are registered in the cloud (online)");
    let (s, dev) = rt.block_on(api.call(reqwest::Method::GET, "/devices/edge-x509-1", None));
    assert_eq!(s, 200, "{dev}");
    assert_eq!(dev["capabilities"]["iotEdge"], true, "{dev}");
    assert_eq!(dev["authentication"]["type"], "selfSigned", "{dev}");
    assert_eq!(
        dev["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        verge_x509::thumbprints(&device.der).1.as_str(),
        "{dev}"
    );
    let (s, m) = rt.block_on(api.call(
        reqwest::Method::GET,
        "/devices/edge-x509-1/modules/$edgeAgent",
        None,
    ));
    assert_eq!(s, 200, "{m}");
    assert_eq!(verged.stop("TERM", Duration::from_secs(30)), Some(0));
    assert_eq!(cloud.stop("TERM", Duration::from_secs(15)), Some(0));
}
