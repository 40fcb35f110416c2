//! Test support: an in-process `verge-hub` on 127.0.0.1 with an rcgen test CA,
//! and connection strings / options for SDK clients talking to it.
//! Also used by the example crates' tests (`#[path]`-included).
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use verge_core::{ModuleId, SharedAccessKey};
use verge_hub::Hub;
use verge_hub::config::Config;
use verge_sdk::ClientOptions;

pub const HUB: &str = "testhub.azure-devices.net";
pub const DEVICE: &str = "edge1";
pub const DEVICE_KEY: &str = "c2RrLXRlc3QtZWRnZS1kZXZpY2Uta2V5LTAxMjM0NTY3";
pub const LEAF_KEY: &str = "c2RrLXRlc3QtbGVhZi1kZXZpY2Uta2V5LTAxMjM0NTY3";
pub const T: Duration = Duration::from_secs(15);

/// Modules known to the test hub: id and generation id.
pub const MODULES: &[(&str, &str)] = &[
    ("modA", "gen-a"),
    ("modB", "gen-b"),
    ("sensor", "gen-s"),
    ("filter", "gen-f"),
    ("observer", "gen-o"),
];

pub const DEFAULT_ROUTES: &str = r#"{
  "schemaVersion": "1.1",
  "routes": {
    "AtoB": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")",
    "leafToB": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO BrokeredEndpoint(\"/modules/modB/inputs/leaf\")",
    "sensorToFilter": "FROM /messages/modules/sensor/outputs/temperatureOutput INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")",
    "sensorToObserver": "FROM /messages/modules/sensor/outputs/temperatureOutput INTO BrokeredEndpoint(\"/modules/observer/inputs/raw\")",
    "filterToObserver": "FROM /messages/modules/filter/outputs/output1 INTO BrokeredEndpoint(\"/modules/observer/inputs/alerts\")"
  },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
}"#;

/// A test CA, the hub's server certificate and a working directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub storage: PathBuf,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub twins_file: PathBuf,
}

pub fn env() -> Env {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    verge_hub::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "verge sdk test CA");
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
    Env {
        storage: dir.path().join("storage"),
        twins_file: dir.path().join("twins.json"),
        ca_pem: ca_cert.pem(),
        dir,
        cert,
        key,
    }
}

impl Env {
    /// The hub config: MQTT and HTTPS on the given 127.0.0.1 addresses.
    pub fn config(&self, routes: &str, mqtt: &str, https: &str) -> Config {
        let routes_file = self.dir.path().join("routes.json");
        std::fs::write(&routes_file, routes).unwrap();
        let modules: String = MODULES
            .iter()
            .map(|(m, g)| format!("{m} = \"{g}\"\n"))
            .collect();
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
{modules}
[devices]
leaf1 = "{LEAF_KEY}"
[limits]
connect_timeout_secs = 5
twins_poll_ms = 100
"#,
            storage = self.storage.display(),
            routes = routes_file.display(),
            twins = self.twins_file.display(),
            cert = self.cert.display(),
            key = self.key.display(),
        );
        Config::from_toml(&text).unwrap()
    }

    /// Starts a hub on free ports.
    pub async fn start_hub(&self, routes: &str) -> Hub {
        Hub::start(self.config(routes, "127.0.0.1:0", "127.0.0.1:0"))
            .await
            .unwrap()
    }

    /// Starts a hub on given ports (restart tests).
    pub async fn start_hub_on(&self, routes: &str, mqtt: u16, https: u16) -> Hub {
        let cfg = self.config(
            routes,
            &format!("127.0.0.1:{mqtt}"),
            &format!("127.0.0.1:{https}"),
        );
        let deadline = tokio::time::Instant::now() + T;
        loop {
            match Hub::start(cfg.clone()).await {
                Ok(h) => return h,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("hub restart: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("hub restart failed: {e:#}"),
            }
        }
    }

    /// Writes the hub's local desired-properties file.
    pub fn set_desired(&self, json: &serde_json::Value) {
        let tmp = self.twins_file.with_extension("tmp");
        std::fs::write(&tmp, json.to_string()).unwrap();
        std::fs::rename(&tmp, &self.twins_file).unwrap();
    }
}

pub fn module_key(module: &str) -> SharedAccessKey {
    let gen_id = MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, g)| *g)
        .unwrap();
    SharedAccessKey::from_base64(DEVICE_KEY)
        .unwrap()
        .derive_module_key(&ModuleId::new(module).unwrap(), gen_id)
}

pub fn module_cs(module: &str) -> String {
    format!(
        "HostName={HUB};DeviceId={DEVICE};ModuleId={module};SharedAccessKey={};GatewayHostName=localhost",
        module_key(module).to_base64()
    )
}

pub fn leaf_cs() -> String {
    format!("HostName={HUB};DeviceId=leaf1;SharedAccessKey={LEAF_KEY};GatewayHostName=localhost")
}

pub fn options(hub: &Hub) -> ClientOptions {
    ClientOptions {
        port: hub.mqtt_addr.port(),
        https_port: hub.https_addr.port(),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        operation_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

pub async fn module(hub: &Hub, env: &Env, m: &str) -> verge_sdk::ModuleClient {
    let c = verge_sdk::ModuleClient::from_connection_string_with(
        &module_cs(m),
        Some(&env.ca_pem),
        options(hub),
    )
    .await
    .unwrap();
    c.wait_connected(T).await.unwrap();
    c
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn path_of(p: &Path) -> String {
    p.display().to_string()
}
