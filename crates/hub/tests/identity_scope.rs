//! Leaf devices from the cloud's device scope: a real verge-cloud (service
//! API over TLS, in-process) lists the children of the edge device; the hub
//! (in-process, config-file mode) fetches them over HTTPS, authenticates
//! them, caches them (0600), and still accepts them after the cloud stopped
//! and the hub restarted. A device that is not a child is refused.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEVICE, DEVICE_KEY, Pki, Raw, cloud_with_edge, code, pki};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use verge_cloud::DeviceSpec;
use verge_cloud::api::{ApiState, ServiceAuth};
use verge_cloud::registry::SymmetricKeys;
use verge_core::{ClientId, SasToken, SharedAccessKey};
use verge_hub::Hub;
use verge_hub::config::Config;

/// The cloud's host name: the audience of every token, and the host dialled.
const CLOUD: &str = "localhost";

fn key(b: u8) -> SharedAccessKey {
    SharedAccessKey::from_bytes(vec![b; 32])
}

fn sym(b: u8) -> SymmetricKeys {
    SymmetricKeys {
        primary: key(b).to_base64(),
        secondary: key(b.wrapping_add(100)).to_base64(),
    }
}

fn hub_config(pki: &Pki, storage: &Path, https_port: u16, ca_file: &Path) -> Config {
    let text = format!(
        r#"
iothub_hostname = "{CLOUD}"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
[listen]
mqtt = "127.0.0.1:0"
https = "127.0.0.1:0"
[tls]
cert = "{cert}"
key = "{key}"
[upstream]
hostname = "{CLOUD}"
port = {mqtt_port}
https_port = {https_port}
ca_file = "{ca}"
scope_refresh_secs = 3600
[limits]
connect_timeout_secs = 3
"#,
        storage = storage.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
        // No MQTT device endpoint in this test: the upstream drain just retries.
        mqtt_port = 1,
        ca = ca_file.display(),
    );
    Config::from_toml(&text).unwrap()
}

async fn connack(
    addr: SocketAddr,
    ca_pem: &str,
    device: &str,
    sign_with: &SharedAccessKey,
) -> ConnectReturnCode {
    let token = SasToken::sign(
        &format!("{CLOUD}/devices/{device}"),
        sign_with,
        verge_hub::auth::unix_now() + 600,
        None,
    )
    .to_string();
    let user = format!("{CLOUD}/{device}/?api-version=2019-10-01");
    let (_raw, ack) = Raw::connect(addr, ca_pem, device, &user, &token, true).await;
    code(ack).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_devices_from_the_cloud_scope_work_offline() {
    verge_hub::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    // The cloud: edge device (SAS key = the hub's device_key), two devices.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_port = listener.local_addr().unwrap().port();
    let cloud_dir = dir.path().join("cloud");
    let (files, cloud, scope) = cloud_with_edge(&cloud_dir, CLOUD).await;
    cloud
        .put_device(
            "leafA",
            DeviceSpec {
                keys: Some(sym(10)),
                parent_scopes: vec![scope],
                ..DeviceSpec::default()
            },
            None,
        )
        .await
        .unwrap();
    cloud
        .put_device(
            "stranger",
            DeviceSpec {
                keys: Some(sym(20)),
                ..DeviceSpec::default()
            },
            None,
        )
        .await
        .unwrap();
    let state = ApiState {
        cloud: cloud.clone(),
        auth: Arc::new(ServiceAuth::new(CLOUD, "iothubowner", key(3))),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(verge_cloud::api::serve(
        listener,
        verge_cloud::tls::server_config(&files).unwrap(),
        state,
        async {
            let _ = stop_rx.await;
        },
    ));

    let pki = pki();
    let storage = dir.path().join("hub");
    let cfg = hub_config(&pki, &storage, api_port, files.ca.as_ref().unwrap());
    let hub = Hub::start(cfg.clone()).await.unwrap();
    let leaf = ClientId::parse("leafA").unwrap();
    let start = Instant::now();
    while hub.state.sas.key_for(&leaf).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the device scope was not fetched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The table the upstream would sign with: the child's primary key.
    assert_eq!(hub.state.sas.key_for(&leaf), Some(key(10)));
    let addr = hub.mqtt_addr;
    assert_eq!(
        connack(addr, &pki.ca_pem, "leafA", &key(10)).await,
        ConnectReturnCode::Success
    );
    // Either of its keys.
    assert_eq!(
        connack(addr, &pki.ca_pem, "leafA", &key(110)).await,
        ConnectReturnCode::Success
    );
    assert_ne!(
        connack(addr, &pki.ca_pem, "leafA", &key(20)).await,
        ConnectReturnCode::Success
    );
    assert_ne!(
        connack(addr, &pki.ca_pem, "stranger", &key(20)).await,
        ConnectReturnCode::Success
    );
    let cache = storage.join("device-scope.json");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The cloud goes away; the hub restarts and still knows its children.
    let _ = stop_tx.send(());
    server.await.unwrap();
    cloud.close();
    hub.shutdown().await;
    let hub = Hub::start(cfg).await.unwrap();
    let addr = hub.mqtt_addr;
    assert_eq!(
        connack(addr, &pki.ca_pem, "leafA", &key(10)).await,
        ConnectReturnCode::Success
    );
    assert_ne!(
        connack(addr, &pki.ca_pem, "stranger", &key(20)).await,
        ConnectReturnCode::Success
    );
    hub.shutdown().await;
}
