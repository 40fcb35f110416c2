//! X.509 devices at verge-cloud with the official Python SDKs, unmodified
//! (script: `python/x509_sdk.py`): a CA certificate uploaded and verified by
//! proof of possession through the certificates resource (wrong proofs
//! refused), devices created with azure-iot-hub 2.7's
//! `create_device_with_x509` / `create_device_with_certificate_authority`,
//! and azure-iot-device 2.14's `create_from_x509_certificate` sending
//! telemetry straight to verge-cloud; the refusals (CONNACK 5) are logged
//! with their reasons. Certificates are made here (verge_testkit::x509), in a temporary
//! directory. The device SDK dials port 8883 only: the test waits for it and
//! is skipped, saying so, only when it cannot be bound.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use rcgen::KeyPair;
use serde_json::{Value, json};
use verge_core::SasToken;
use verge_testkit::cloud::{CloudProc, Config};
use verge_testkit::x509::{Ca, leaf, params, root};

#[test]
fn azure_python_sdks_with_x509_devices() {
    let python = verge_testkit::azure_python("azure.iot.device, azure.iot.hub");
    assert!(
        verge_testkit::port_free_within(8883, Duration::from_secs(90)),
        "127.0.0.1:8883 (the only port the Azure device SDK dials) stayed taken: another test or a broker holds it"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let mut cloud = CloudProc::start(
        Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
        &Config::new(&data)
            .mqtt_listen("127.0.0.1:8883")
            .policy_key(&key)
            .render(),
        dir.path(),
        "info",
    );
    let https = cloud.https().to_owned();

    // Certificates.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let trusted = root("Verge Test Root");
    let untrusted = root("Someone Else's Root");
    let mut files = serde_json::Map::new();
    let mut add = |name: &str, cn: &str, ca: Option<&Ca>, is_ca: bool, days| {
        let l = leaf(cn, ca, is_ca, days);
        let (paths, der) = (l.write(&certs, name), l.der);
        files.insert(name.to_owned(), json!(paths));
        der
    };
    let ss = add("ss", "ss1", None, false, (-1, 10));
    let second = add("second", "anything", None, false, (-1, 10));
    add("other", "ss1", None, false, (-1, 10));
    let expired = add("expired", "ss1", None, false, (-10, -1));
    add("ca1", "ca1", Some(&trusted), false, (-1, 10));
    add("untrusted", "ca1", Some(&untrusted), false, (-1, 10));
    add("ca_as_leaf", "ca1", Some(&trusted), true, (-1, 10));
    let (ss_sha1, ss_sha256) = verge_x509::thumbprints(&ss);
    let (_, second_sha256) = verge_x509::thumbprints(&second);
    let _ = expired;

    // The CA: uploaded, then verified by proof of possession.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_path = data.join("tls/ca.pem");
    let server_ca = std::fs::read(&ca_path).unwrap();
    let http = reqwest::blocking_free_client(&server_ca);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = https.clone();
    let policy = verge_core::SharedAccessKey::from_base64(&key).unwrap();
    let token = SasToken::sign(&host, &policy, 4_000_000_000, Some("iothubowner")).to_string();
    let call = |method: reqwest::Method, path: &str, body: Value| -> (u16, Value) {
        rt.block_on(async {
            let r = http
                .request(method, format!("https://{host}{path}"))
                .header("Authorization", &token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        })
    };
    let (s, v) = call(
        reqwest::Method::PUT,
        "/certificates/root",
        json!({"properties": {"certificate": trusted.pem}}),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["properties"]["isVerified"], false, "{v}");
    // A device certificate is not a CA.
    let (s, _) = call(
        reqwest::Method::PUT,
        "/certificates/leaf",
        json!({"properties": {"certificate": std::fs::read_to_string(certs.join("ss.pem")).unwrap()}}),
    );
    assert_eq!(s, 400);
    let (s, v) = call(
        reqwest::Method::POST,
        "/certificates/root/generateVerificationCode",
        json!({}),
    );
    assert_eq!(s, 200, "{v}");
    let code = v["properties"]["verificationCode"]
        .as_str()
        .unwrap()
        .to_owned();
    let proof = |ca: &Ca, cn: &str| {
        let key = KeyPair::generate().unwrap();
        params(cn, false, -1, 1)
            .signed_by(&key, &ca.issuer)
            .unwrap()
            .pem()
    };
    for (bad, why) in [
        (proof(&untrusted, &code), "signed by another key"),
        (proof(&trusted, "not-the-code"), "CN is not the code"),
    ] {
        let (s, v) = call(
            reqwest::Method::POST,
            "/certificates/root/verify",
            json!({ "certificate": bad }),
        );
        assert_eq!(s, 400, "{why}: {v}");
    }
    let (s, v) = call(
        reqwest::Method::POST,
        "/certificates/root/verify",
        json!({ "certificate": proof(&trusted, &code) }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["properties"]["isVerified"], true, "{v}");
    let (s, v) = call(reqwest::Method::GET, "/certificates", Value::Null);
    assert_eq!(
        (s, v["value"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );

    // The SDKs.
    let cs = format!("HostName={https};SharedAccessKeyName=iothubowner;SharedAccessKey={key}");
    let params = json!({
        "service_connection_string": cs,
        "device_host": "127.0.0.1",
        "ca": ca_path,
        "certs": files,
        "thumbprints": {"ss_sha256": ss_sha256, "ss_sha1": ss_sha1, "second_sha256": second_sha256},
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/x509_sdk.py");
    let (status, stdout, stderr) = verge_testkit::run_bounded(
        Command::new(&python)
            .arg(&script)
            .arg(params.to_string())
            .env("REQUESTS_CA_BUNDLE", &ca_path),
        Duration::from_secs(180),
    );
    cloud.stop("TERM", Duration::from_secs(10));
    let log = cloud.log();
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("ALL PASS"),
        "x509 SDK script failed (status {status:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n\
         --- verge-cloud log\n{log}",
        tail(&stderr, 60),
    );
    // Each refusal is logged with its reason.
    for reason in [
        "matches neither registered thumbprint",
        "expired at",
        "is not the device id",
        "does not lead to a trusted CA",
        "is a CA certificate",
        "device off1 is disabled",
    ] {
        assert!(log.contains(reason), "no {reason:?} in the log:\n{log}");
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

mod reqwest {
    pub use ::reqwest::*;

    /// An async client trusting only verge-cloud's generated CA.
    pub fn blocking_free_client(ca_pem: &[u8]) -> Client {
        Client::builder()
            .tls_certs_only([Certificate::from_pem(ca_pem).unwrap()])
            .build()
            .unwrap()
    }
}
