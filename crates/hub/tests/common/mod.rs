//! Shared helpers for the hub's integration tests: a test PKI, configs, SAS
//! tokens and a raw MQTT-over-TLS client.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use verge_core::{ModuleId, SasToken, SharedAccessKey};
use verge_hub::config::Config;

pub const HUB: &str = "testhub.azure-devices.net";
pub const DEVICE: &str = "edge1";
pub const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";
pub const LEAF_KEY: &str = "bGVhZi1kZXZpY2Uta2V5LWZvci10ZXN0cy0xMjM0NTY=";
pub const T: Duration = Duration::from_secs(10);

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "verge test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let cert = dir.path().join("hub.pem");
    let key = dir.path().join("hub.key");
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        dir,
        cert,
        key,
    }
}

pub const ROUTES: &str = r#"{
  "schemaVersion": "1.1",
  "routes": {
    "AtoB": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")",
    "leafUp": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream"
  },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
}"#;

/// Writes routes and a config into `pki.dir` (storage under `storage`).
pub fn config(pki: &Pki, storage: &Path, mqtt: &str, https: &str) -> Config {
    let routes = pki.dir.path().join("routes.json");
    std::fs::write(&routes, ROUTES).unwrap();
    let twins = pki.dir.path().join("twins.json");
    let text = format!(
        r#"
iothub_hostname = "{HUB}"
hostname = "localhost"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
twins_file = "{twins}"
[listen]
mqtt = "{mqtt}"
https = "{https}"
[tls]
cert = "{cert}"
key = "{key}"
[modules]
modA = "gen-a"
modB = "gen-b"
[devices]
leaf1 = "{LEAF_KEY}"
[limits]
connect_timeout_secs = 3
twins_poll_ms = 100
"#,
        storage = storage.display(),
        routes = routes.display(),
        twins = twins.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    std::fs::write(pki.dir.path().join("hub.toml"), &text).unwrap();
    Config::from_toml(&text).unwrap()
}

pub fn module_key(module: &str) -> SharedAccessKey {
    let gen_id = match module {
        "modA" => "gen-a",
        "modB" => "gen-b",
        _ => "gen-x",
    };
    SharedAccessKey::from_base64(DEVICE_KEY)
        .unwrap()
        .derive_module_key(&ModuleId::new(module).unwrap(), gen_id)
}

pub fn now() -> u64 {
    verge_hub::auth::unix_now()
}

pub fn module_token(module: &str) -> String {
    SasToken::sign(
        &format!("{HUB}/devices/{DEVICE}/modules/{module}"),
        &module_key(module),
        now() + 3600,
        None,
    )
    .to_string()
}

pub fn username(client_id: &str) -> String {
    format!("{HUB}/{client_id}/?api-version=2019-10-01&DeviceClientType=test")
}

pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    verge_hub::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A bare MQTT 3.1.1 client over TLS, packet by packet.
pub struct Raw {
    pub s: TlsStream<TcpStream>,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn open(addr: SocketAddr, ca_pem: &str) -> Raw {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let s = tokio::time::timeout(T, tls_connector(ca_pem).connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 22).unwrap();
        self.s.write_all(&out).await.unwrap();
        self.s.flush().await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// The next packet; `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(T, async {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, 1 << 22) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("bad packet from server: {e}"),
                    }
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("timed out waiting for a packet")
    }

    /// Connects as `client_id` with `password`; returns the CONNACK (or None if closed).
    pub async fn connect(
        addr: SocketAddr,
        ca_pem: &str,
        client_id: &str,
        user: &str,
        password: &str,
        clean: bool,
    ) -> (Raw, Option<Packet>) {
        let mut raw = Raw::open(addr, ca_pem).await;
        let mut c = Connect::new(client_id);
        c.clean_session = clean;
        c.keep_alive = 60;
        c.set_credentials(user, password.to_owned());
        raw.send(Packet::Connect(c)).await;
        let ack = raw.recv().await;
        (raw, ack)
    }
}
