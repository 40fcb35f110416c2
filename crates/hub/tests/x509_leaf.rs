//! X.509 leaf devices at the hub, against a real verge-cloud in-process
//! (service API for the device scope, device endpoint as the upstream):
//! self-signed (SHA-256 primary and secondary, or SHA-1 thumbprints) and CA-signed
//! leaves (CN = id, chained through an intermediate the client sends to the
//! root in the hub's `trust_bundle`) connect with an empty password and a
//! client certificate, on MQTT/TLS and over WebSocket; their telemetry
//! reaches the cloud as themselves, carried by the hub's identity on their
//! behalf. Refused with CONNACK 5: wrong thumbprint, expired, not yet valid,
//! CN ≠ id, untrusted CA, a CA certificate as leaf, a disabled device, a
//! module with a certificate, a SAS device with a certificate, a device
//! outside the scope. After the cloud stops and the hub restarts, the cached
//! scope still admits them. Certificates are made here with rcgen.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEVICE, DEVICE_KEY, Pki, Raw, cloud_with_edge, code, pki};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use verge_cloud::api::{ApiState, ServiceAuth};
use verge_cloud::registry::SymmetricKeys;
use verge_cloud::{CloudState, DeviceSpec, DeviceStatus};
use verge_core::{ClientId, SharedAccessKey};
use verge_hub::Hub;
use verge_hub::config::Config;
use verge_x509::X509Auth;

const CLOUD: &str = "localhost";
const DAY: i64 = 86_400;

/// A certificate and its key, PEM and DER.
struct Id {
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn unix_now() -> i64 {
    verge_hub::auth::unix_now() as i64
}

fn params(cn: &str, ca: bool, from_days: i64, to_days: i64) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let t = time::OffsetDateTime::from_unix_timestamp(unix_now()).unwrap();
    p.not_before = t + time::Duration::seconds(from_days * DAY);
    p.not_after = t + time::Duration::seconds(to_days * DAY);
    p
}

struct Ca {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, true, -1, 30);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

fn intermediate(cn: &str, parent: &Ca) -> Ca {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, true, -1, 20);
    let cert = p.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

fn leaf(cn: &str, ca: Option<&Ca>, is_ca: bool, from: i64, to: i64) -> Id {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, is_ca, from, to);
    let cert = match ca {
        Some(ca) => p.signed_by(&key, &ca.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    let mut chain = vec![cert.der().clone()];
    if let Some(ca) = ca {
        chain.push(ca.der.clone());
    }
    Id {
        chain,
        key_der: key.serialize_der(),
    }
}

fn connector(ca_pem: &str, id: &Id) -> tokio_rustls::TlsConnector {
    verge_hub::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    // TLS 1.2 as the Python SDK speaks it; 1.3 is covered by the WebSocket case.
    let cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_client_auth_cert(
            id.chain.clone(),
            PrivateKeyDer::try_from(id.key_der.clone()).unwrap(),
        )
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// CONNECT as `client` with an empty password and `id`'s certificate.
async fn connect_x509(
    addr: SocketAddr,
    ca_pem: &str,
    client: &str,
    id: &Id,
) -> (ConnectReturnCode, Raw) {
    connect_with(addr, &connector(ca_pem, id), client).await
}

/// CONNECT as `client` with an empty password over TLS made by `tls`.
async fn connect_with(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    client: &str,
) -> (ConnectReturnCode, Raw) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // As the SDKs do; without it, Nagle adds a delayed-ACK wait per handshake.
    tcp.set_nodelay(true).unwrap();
    let s = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let user = format!("{CLOUD}/{client}/?api-version=2019-10-01");
    let (raw, ack) = Raw::over(s).handshake(client, &user, "", true).await;
    (code(ack).0, raw)
}

fn hub_config(pki: &Pki, dir: &Path, https_port: u16, mqtt_port: u16, cloud_ca: &Path) -> Config {
    hub_config_on(pki, dir, "127.0.0.1:0", https_port, mqtt_port, cloud_ca)
}

fn hub_config_on(
    pki: &Pki,
    dir: &Path,
    listen_mqtt: &str,
    https_port: u16,
    mqtt_port: u16,
    cloud_ca: &Path,
) -> Config {
    let trust = dir.join("trust-bundle.pem");
    let routes = dir.join("routes.json");
    std::fs::write(
        &routes,
        r#"{"schemaVersion": "1.1", "routes": {"up": "FROM /messages/* INTO $upstream"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}"#,
    )
    .unwrap();
    let text = format!(
        r#"
iothub_hostname = "{CLOUD}"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
trust_bundle = "{trust}"
[listen]
mqtt = "{listen_mqtt}"
https = "127.0.0.1:0"
[tls]
cert = "{cert}"
key = "{key}"
[modules]
modA = "gen-a"
[upstream]
hostname = "{CLOUD}"
port = {mqtt_port}
https_port = {https_port}
ca_file = "{ca}"
scope_refresh_secs = 3600
[limits]
connect_timeout_secs = 3
routes_poll_ms = 100
"#,
        storage = dir.join("hub").display(),
        routes = routes.display(),
        trust = trust.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = cloud_ca.display(),
    );
    Config::from_toml(&text).unwrap()
}

async fn put(cloud: &CloudState, id: &str, spec: DeviceSpec) {
    cloud.put_device(id, spec, None).await.unwrap();
}

fn x509(auth: X509Auth, scope: &str) -> DeviceSpec {
    DeviceSpec {
        x509: Some(auth),
        parent_scopes: vec![scope.to_owned()],
        ..DeviceSpec::default()
    }
}

fn self_signed(primary: &str, secondary: Option<&str>) -> X509Auth {
    X509Auth::SelfSigned {
        primary: Some(primary.to_owned()),
        secondary: secondary.map(str::to_owned),
    }
}

/// Publishes one QoS 1 message and waits for its PUBACK.
async fn send(raw: &mut Raw, client: &str, body: &str) {
    let mut p = Publish::new(
        format!("devices/{client}/messages/events/"),
        QoS::AtLeastOnce,
        body.as_bytes().to_vec(),
    );
    p.pkid = 1;
    raw.send(Packet::Publish(p)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// verge-cloud in-process: its service API (device scope) and its device
/// endpoint (the hub's upstream), with the edge device registered.
struct CloudUp {
    cloud: CloudState,
    scope: String,
    api_port: u16,
    mqtt_port: u16,
    /// The device endpoint over AMQPS (the hub's upstream with `Amqp`).
    amqp_port: u16,
    ca_file: std::path::PathBuf,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    api: tokio::task::JoinHandle<()>,
    endpoint: tokio::task::JoinHandle<()>,
    amqp_endpoint: tokio::task::JoinHandle<()>,
}

impl CloudUp {
    async fn start(dir: &Path) -> CloudUp {
        let cloud_dir = dir.join("cloud");
        let (files, cloud, scope) = cloud_with_edge(&cloud_dir, CLOUD).await;
        let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_port = api_listener.local_addr().unwrap().port();
        let api_tls = verge_cloud::tls::server_config(&files).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let api = tokio::spawn(verge_cloud::api::serve(
            api_listener,
            api_tls.clone(),
            ApiState {
                cloud: cloud.clone(),
                auth: Arc::new(ServiceAuth::new(
                    CLOUD,
                    "iothubowner",
                    SharedAccessKey::from_bytes(vec![3; 32]),
                )),
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let backend = verge_cloud::device::CloudBackend::open(
            cloud.clone(),
            cloud_dir.join("mqtt-sessions.json"),
        )
        .await
        .unwrap();
        let mqtt_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mqtt_port = mqtt_listener.local_addr().unwrap().port();
        let device_tls = verge_cloud::device::mqtt_tls(&api_tls);
        let endpoint =
            common::serve_devices(mqtt_listener, device_tls.clone(), backend.clone(), false);
        let amqp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let amqp_port = amqp_listener.local_addr().unwrap().port();
        let amqp_endpoint = common::serve_devices(amqp_listener, device_tls, backend, true);
        CloudUp {
            cloud,
            scope,
            api_port,
            mqtt_port,
            amqp_port,
            ca_file: files.ca.clone().unwrap(),
            stop_tx,
            api,
            endpoint,
            amqp_endpoint,
        }
    }

    /// (device id, body) of every D2C message so far.
    fn d2c(&self) -> Vec<(String, String)> {
        self.cloud
            .read_d2c(0, 1000)
            .unwrap()
            .into_iter()
            .map(|e| {
                (
                    e.message
                        .system
                        .connection_device_id
                        .clone()
                        .unwrap_or_default(),
                    String::from_utf8_lossy(&e.message.body).into_owned(),
                )
            })
            .collect()
    }

    /// Waits (30 s at most) until the cloud holds every `(device, body)`.
    async fn wait_for(&self, want: &[(&str, &str)]) {
        let start = Instant::now();
        loop {
            let got = self.d2c();
            if want
                .iter()
                .all(|(d, b)| got.contains(&((*d).to_owned(), (*b).to_owned())))
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "telemetry not upstream: want {want:?}, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop_tx.send(());
        self.api.await.unwrap();
        self.endpoint.abort();
        let _ = self.endpoint.await;
        self.amqp_endpoint.abort();
        let _ = self.amqp_endpoint.await;
        self.cloud.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_leaves_at_the_hub() {
    verge_hub::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();

    // Certificates.
    let trusted_root = root("Verge Test Root");
    let inter = intermediate("Verge Test Intermediate", &trusted_root);
    let other_root = root("Untrusted Root");
    let ss = leaf("ss1", None, false, -1, 10);
    let ss_second = leaf("whatever", None, false, -1, 10);
    let (ss_sha1, ss_sha256) = verge_x509::thumbprints(&ss.chain[0]);
    let (_, second_sha256) = verge_x509::thumbprints(&ss_second.chain[0]);
    let ca_leaf = leaf("ca1", Some(&inter), false, -1, 10);

    let up = CloudUp::start(dir.path()).await;
    let (cloud, scope) = (up.cloud.clone(), up.scope.clone());
    put(
        &cloud,
        "ss1",
        x509(self_signed(&ss_sha256, Some(&second_sha256)), &scope),
    )
    .await;
    put(&cloud, "ss2", x509(self_signed(&ss_sha1, None), &scope)).await;
    put(&cloud, "ca1", x509(X509Auth::CertificateAuthority, &scope)).await;
    let mut off = x509(self_signed(&ss_sha1, None), &scope);
    off.status = Some(DeviceStatus::Disabled);
    put(&cloud, "off1", off).await;
    put(
        &cloud,
        "sas1",
        DeviceSpec {
            keys: Some(SymmetricKeys {
                primary: SharedAccessKey::from_bytes(vec![7; 32]).to_base64(),
                secondary: SharedAccessKey::from_bytes(vec![8; 32]).to_base64(),
            }),
            parent_scopes: vec![scope.clone()],
            ..DeviceSpec::default()
        },
    )
    .await;
    // Registered, but not a child of this edge.
    put(
        &cloud,
        "stranger",
        DeviceSpec {
            x509: Some(self_signed(&ss_sha1, None)),
            ..DeviceSpec::default()
        },
    )
    .await;

    // The hub: trusts the root only; the intermediate comes from the client.
    let pki = pki();
    std::fs::write(dir.path().join("trust-bundle.pem"), &trusted_root.pem).unwrap();
    let cfg = hub_config(&pki, dir.path(), up.api_port, up.mqtt_port, &up.ca_file);
    let hub = Hub::start(cfg.clone()).await.unwrap();
    let start = Instant::now();
    let ss1 = ClientId::parse("ss1").unwrap();
    while !hub.state.sas.x509_devices().contains_key(&ss1) {
        assert!(start.elapsed() < Duration::from_secs(20), "no device scope");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = hub.mqtt_addr;
    let ca_pem = pki.ca_pem.clone();
    let ok = ConnectReturnCode::Success;
    let refused = ConnectReturnCode::NotAuthorized;

    // Accepted: either thumbprint (SHA-256; SHA-1 for ss2), and CA-signed
    // through the intermediate the client sent.
    assert_eq!(connect_x509(addr, &ca_pem, "ss1", &ss_second).await.0, ok);
    assert_eq!(connect_x509(addr, &ca_pem, "ss2", &ss).await.0, ok);
    assert_eq!(connect_x509(addr, &ca_pem, "ca1", &ca_leaf).await.0, ok);
    let (c, mut ss_conn) = connect_x509(addr, &ca_pem, "ss1", &ss).await;
    assert_eq!(c, ok);
    send(&mut ss_conn, "ss1", "from-ss1").await;
    let (c, mut ca_conn) = connect_x509(addr, &ca_pem, "ca1", &ca_leaf).await;
    assert_eq!(c, ok);
    send(&mut ca_conn, "ca1", "from-ca1").await;

    // Refused, each for its reason (the typed reason the hub logs).
    let cases: Vec<(&str, Id, &str)> = vec![
        ("ss1", leaf("ss1", None, false, -1, 10), "thumbprint"),
        ("ss1", leaf("ss1", None, false, -10, -1), "expired"),
        ("ss1", leaf("ss1", None, false, 1, 10), "not valid before"),
        ("ca1", leaf("ca2", Some(&inter), false, -1, 10), "CN"),
        (
            "ca1",
            leaf("ca1", Some(&other_root), false, -1, 10),
            "trusted CA",
        ),
        (
            "ca1",
            leaf("ca1", Some(&inter), true, -1, 10),
            "CA certificate",
        ),
        ("ca1", leaf("ca1", Some(&inter), false, -10, -1), "expired"),
        ("off1", leaf("off1", None, false, -1, 10), "disabled"),
        (
            "sas1",
            leaf("sas1", None, false, -1, 10),
            "not registered for X.509",
        ),
        (
            "stranger",
            leaf("stranger", None, false, -1, 10),
            "unknown identity",
        ),
        (
            "edge1/modA",
            leaf("edge1/modA", None, false, -1, 10),
            "modules cannot",
        ),
    ];
    for (client, id, why) in &cases {
        assert_eq!(
            connect_x509(addr, &ca_pem, client, id).await.0,
            refused,
            "{client}: {why}"
        );
        let e = hub
            .state
            .sas
            .verify_x509(&ClientId::parse(client).unwrap(), &id.chain)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{client}: {e:?} should say {why:?}");
    }
    // The disabled device's reason holds for its right certificate too.
    assert_eq!(connect_x509(addr, &ca_pem, "off1", &ss).await.0, refused);

    // MQTT over WebSocket on the HTTPS listener (TLS 1.3 here).
    for (id, want) in [(&ss, ok), (&ss_second, ok), (&cases[0].1, refused)] {
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                id.chain.clone(),
                PrivateKeyDer::try_from(id.key_der.clone()).unwrap(),
            )
            .unwrap();
        let raw = common::ws_open_with(
            hub.https_addr,
            tokio_rustls::TlsConnector::from(Arc::new(tls)),
            "/$iothub/websocket",
            Some("mqtt"),
        )
        .await
        .unwrap();
        let user = format!("{CLOUD}/ss1/?api-version=2019-10-01");
        let (_raw, ack) = raw.handshake("ss1", &user, "", true).await;
        assert_eq!(code(ack).0, want, "over WebSocket");
    }

    // Upstream: the messages reach the cloud as ss1 and ca1.
    up.wait_for(&[("ss1", "from-ss1"), ("ca1", "from-ca1")])
        .await;
    drop((ss_conn, ca_conn));

    // Offline: the cloud stops, the hub restarts from its cache.
    up.stop().await;
    hub.shutdown().await;
    let hub = Hub::start(cfg).await.unwrap();
    let addr = hub.mqtt_addr;
    assert_eq!(connect_x509(addr, &ca_pem, "ss1", &ss).await.0, ok);
    assert_eq!(connect_x509(addr, &ca_pem, "ca1", &ca_leaf).await.0, ok);
    assert_eq!(
        connect_x509(addr, &ca_pem, "ss1", &leaf("ss1", None, false, -1, 10))
            .await
            .0,
        refused
    );
    hub.shutdown().await;
}

/// Writes `{name}.pem` (chain) and `{name}.key` under `dir`.
fn write_id(dir: &Path, name: &str, id: &Id) -> serde_json::Value {
    // rcgen's key DER is PKCS#8: "PRIVATE KEY".
    let pem = |tag: &str, der: &[u8]| {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            body.join("\n")
        )
    };
    let chain: String = id.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, chain).unwrap();
    std::fs::write(&k, pem("PRIVATE KEY", &id.key_der)).unwrap();
    serde_json::json!([c, k])
}

/// The official Python device SDK's X.509 client through the hub (MQTT on
/// 8883, the only port it dials): a self-signed and a CA-signed leaf send
/// telemetry that reaches verge-cloud; a wrong certificate and a module
/// with a certificate are refused. Skipped, saying so, only when 8883
/// cannot be bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_x509_leaves_through_the_hub() {
    verge_hub::install_crypto_provider();
    let python = verge_testkit::azure_python("azure.iot.device");
    let free = tokio::task::spawn_blocking(|| {
        verge_testkit::port_free_within(8883, Duration::from_secs(90))
    });
    assert!(
        free.await.unwrap(),
        "127.0.0.1:8883 (the only port the Azure device SDK dials) stayed taken: another test or a broker holds it"
    );
    let dir = tempfile::tempdir().unwrap();
    let trusted_root = root("Verge Test Root");
    let pyss = leaf("pyss", None, false, -1, 10);
    let pyca = leaf("pyca", Some(&trusted_root), false, -1, 10);
    let wrong = leaf("pyss", None, false, -1, 10);
    let up = CloudUp::start(dir.path()).await;
    let (_, sha256) = verge_x509::thumbprints(&pyss.chain[0]);
    put(
        &up.cloud,
        "pyss",
        x509(self_signed(&sha256, None), &up.scope),
    )
    .await;
    put(
        &up.cloud,
        "pyca",
        x509(X509Auth::CertificateAuthority, &up.scope),
    )
    .await;
    let pki = pki();
    std::fs::write(dir.path().join("trust-bundle.pem"), &trusted_root.pem).unwrap();
    let cfg = hub_config_on(
        &pki,
        dir.path(),
        "127.0.0.1:8883",
        up.api_port,
        up.mqtt_port,
        &up.ca_file,
    );
    let hub = Hub::start(cfg).await.unwrap();
    let start = Instant::now();
    while hub.state.sas.x509_devices().len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "no device scope");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ca = dir.path().join("hub-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let certs = serde_json::json!({
        "pyss": write_id(dir.path(), "pyss", &pyss),
        "pyca": write_id(dir.path(), "pyca", &pyca),
        "wrong": write_id(dir.path(), "wrong", &wrong),
    });
    let params = serde_json::json!({"host": "localhost", "ca": ca, "edge": DEVICE, "certs": certs});
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/x509_leaf.py");
    run_script(&python, &script, &[&params.to_string()]).await;
    up.wait_for(&[("pyss", "py-pyss"), ("pyca", "py-pyca")])
        .await;
    hub.shutdown().await;
    up.stop().await;
}

/// Runs `script` with `python` and `args` (bounded); asserts it printed ALL PASS.
async fn run_script(python: &Path, script: &Path, args: &[&str]) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python)
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python script timed out")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL PASS"),
        "{} failed\n--- stdout\n{stdout}\n--- stderr\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An X.509 leaf over AMQPS (#22, #23 item 1): Qpid Proton presents the
/// leaf's certificate and no token (SASL ANONYMOUS, no `$cbs`), its
/// telemetry is carried upstream to verge-cloud; a certificate with the same
/// CN the hub does not know is refused `amqp:unauthorized-access`. The same
/// script checks verge-cloud's AMQP endpoint (cloud/tests/amqp_devices.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_leaf_over_amqp() {
    x509_leaf_over_amqp_upstream(false).await;
}

/// The same with the hub's upstream over AMQP: the hub holds no key of
/// the leaf, so it puts its own token on `$cbs` for the leaf's name (on
/// its behalf, as over MQTT), and verge-cloud lets the parent edge carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_leaf_over_amqp_carried_on_its_behalf_over_the_amqp_upstream() {
    x509_leaf_over_amqp_upstream(true).await;
}

async fn x509_leaf_over_amqp_upstream(amqp_upstream: bool) {
    verge_hub::install_crypto_provider();
    let python = verge_testkit::proton_python();
    let dir = tempfile::tempdir().unwrap();
    let ss = leaf("amqpss", None, false, -1, 10);
    let stranger = leaf("amqpss", None, false, -1, 10);
    let up = CloudUp::start(dir.path()).await;
    let (_, sha256) = verge_x509::thumbprints(&ss.chain[0]);
    put(
        &up.cloud,
        "amqpss",
        x509(self_signed(&sha256, None), &up.scope),
    )
    .await;
    let pki = pki();
    std::fs::write(dir.path().join("trust-bundle.pem"), &pki.ca_pem).unwrap();
    let mut cfg = hub_config(&pki, dir.path(), up.api_port, up.mqtt_port, &up.ca_file);
    let amqps = verge_testkit::net::free_port();
    cfg.listen.amqps = Some(SocketAddr::from(([127, 0, 0, 1], amqps)));
    if amqp_upstream {
        let upstream = cfg.upstream.as_mut().unwrap();
        upstream.protocol = Some(verge_dial::UpstreamProtocol::Amqp);
        upstream.amqp_port = up.amqp_port;
    }
    let hub = Hub::start(cfg).await.unwrap();
    let start = Instant::now();
    while hub.state.sas.x509_devices().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "no device scope");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ca = dir.path().join("hub-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let params = serde_json::json!({
        "host": CLOUD, "device": "amqpss", "key": "", "ca": ca, "amqps_port": amqps,
        "https_port": 0,
        "sas_dir": std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python"),
        "x509_device": "amqpss",
        "x509": write_id(dir.path(), "amqpss", &ss),
        "stranger": write_id(dir.path(), "stranger", &stranger),
    });
    let params_path = dir.path().join("amqp.json");
    std::fs::write(&params_path, params.to_string()).unwrap();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../cloud/tests/python/amqp_device.py");
    let params_arg = params_path.display().to_string();
    run_script(&python, &script, &[&params_arg, "proton-x509"]).await;
    up.wait_for(&[("amqpss", "over-amqps-x509")]).await;
    let carried = up.cloud.get_device("amqpss").unwrap().to_json()["connectionProtocol"].clone();
    assert_eq!(carried, if amqp_upstream { "AMQP" } else { "MQTT" });
    hub.shutdown().await;
    up.stop().await;
}

/// CONNECT handshakes per second, SAS vs X.509 (self-signed and CA-signed),
/// in one run against one hub: each is a new TCP + TLS 1.2 handshake (the
/// Python SDK's), CONNECT, CONNACK 0. `cargo test -p verge-hub --test
/// x509_leaf -- --ignored --nocapture` (numbers are only comparable within a
/// run; use a release build for absolute ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_connects_x509_vs_sas() {
    verge_hub::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let trusted_root = root("Verge Test Root");
    let ss = leaf("bss", None, false, -1, 10);
    let ca_leaf = leaf("bca", Some(&trusted_root), false, -1, 10);
    let up = CloudUp::start(dir.path()).await;
    let (_, sha256) = verge_x509::thumbprints(&ss.chain[0]);
    put(
        &up.cloud,
        "bss",
        x509(self_signed(&sha256, None), &up.scope),
    )
    .await;
    put(
        &up.cloud,
        "bca",
        x509(X509Auth::CertificateAuthority, &up.scope),
    )
    .await;
    let sas_key = SharedAccessKey::from_bytes(vec![7; 32]);
    put(
        &up.cloud,
        "bsas",
        DeviceSpec {
            keys: Some(SymmetricKeys {
                primary: sas_key.to_base64(),
                secondary: sas_key.to_base64(),
            }),
            parent_scopes: vec![up.scope.clone()],
            ..DeviceSpec::default()
        },
    )
    .await;
    let pki = pki();
    std::fs::write(dir.path().join("trust-bundle.pem"), &trusted_root.pem).unwrap();
    let cfg = hub_config(&pki, dir.path(), up.api_port, up.mqtt_port, &up.ca_file);
    let hub = Hub::start(cfg).await.unwrap();
    let start = Instant::now();
    while hub.state.sas.x509_devices().len() < 2
        || hub
            .state
            .sas
            .key_for(&ClientId::parse("bsas").unwrap())
            .is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no device scope");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = hub.mqtt_addr;
    let ca_pem = Arc::new(pki.ca_pem.clone());
    let sas_tls = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    };
    const N: usize = 200;
    // One at a time: parallel CONNECTs of one identity would take each
    // other's session over.
    const PAR: usize = 1;
    let (ss_tls, ca_tls) = (connector(&ca_pem, &ss), connector(&ca_pem, &ca_leaf));
    let run = |kind: &'static str| {
        let (sas_tls, sas_key) = (sas_tls.clone(), sas_key.clone());
        let (ss, ca_leaf) = (ss_tls.clone(), ca_tls.clone());
        async move {
            let t = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..PAR {
                let (sas_tls, sas_key) = (sas_tls.clone(), sas_key.clone());
                let (ss, ca_leaf) = (ss.clone(), ca_leaf.clone());
                tasks.spawn(async move {
                    for _ in 0..N / PAR {
                        let c = match kind {
                            "sas" => {
                                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                                tcp.set_nodelay(true).unwrap();
                                let s = sas_tls
                                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                                    .await
                                    .unwrap();
                                let token = verge_core::SasToken::sign(
                                    &format!("{CLOUD}/devices/bsas"),
                                    &sas_key,
                                    verge_hub::auth::unix_now() + 600,
                                    None,
                                )
                                .to_string();
                                let user = format!("{CLOUD}/bsas/?api-version=2019-10-01");
                                let (_raw, ack) =
                                    Raw::over(s).handshake("bsas", &user, &token, true).await;
                                code(ack).0
                            }
                            "self-signed" => connect_with(addr, &ss, "bss").await.0,
                            _ => connect_with(addr, &ca_leaf, "bca").await.0,
                        };
                        assert_eq!(c, ConnectReturnCode::Success, "{kind}");
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            N as f64 / t.elapsed().as_secs_f64()
        }
    };
    // Interleaved rounds, so load changes on the machine hit all three alike.
    let mut rates: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for _ in 0..3 {
        for kind in ["sas", "self-signed", "ca-signed"] {
            let r = run(kind).await;
            rates.entry(kind).or_default().push(r);
        }
    }
    for (kind, r) in &rates {
        let mut r = r.clone();
        r.sort_by(f64::total_cmp);
        println!(
            "{kind:12} CONNECTs/s (new TLS 1.2 handshake each, {PAR} at a time): median {:.0} (min {:.0}, max {:.0})",
            r[1], r[0], r[2]
        );
    }
    hub.shutdown().await;
    up.stop().await;
}
