//! edgeHub's settings as an Azure deployment manifest gives them: the
//! environment variables of the `edgeHub` system module.
//!
//! Run by verged without `--config` (the Azure layout: the manifest is the
//! only configuration), the hub builds its whole configuration from the
//! module environment ([`config_without_file`]): identities and the server
//! certificate from verged, routes from its `$edgeHub` twin, and
//!
//! | variable | effect |
//! |---|---|
//! | `storageFolder` | store, sessions and twins in `{storageFolder}/edgeHub` (else the temp directory: lost with the container, as edgeHub's) |
//! | `MaxUpstreamBatchSize` | `[upstream] batch_size` |
//! | `DeviceScopeCacheRefreshRateSecs` | `[upstream] scope_refresh_secs` |
//! | `CloudConnectionIdleTimeoutSecs`, `CloseCloudConnectionOnIdleTimeout` | `[upstream] idle_timeout_secs`, `close_on_idle` |
//! | `HttpSettings__Port` | the HTTPS listener's port (443) |
//! | `AmqpSettings__Enabled`, `AmqpSettings__Port` | the AMQPS listener (on, 5671), as edgeHub's |
//! | `UpstreamProtocol`, `https_proxy` | the upstream link (`upstream/transport.rs`; also with a config file); default `Amqp`, as edgeHub's |
//! | `RuntimeLogLevel` | the log level (verge-log) |
//! | `MetricsEnabled`, `Metrics__Listener__Host/Port/Suffix` | the Prometheus endpoint (`metrics.rs`; also with a config file) |
//! | `VERGE_HUB_LISTEN_MQTT`, `VERGE_HUB_LISTEN_HTTPS`, `VERGE_HUB_LISTEN_AMQPS` | listen addresses (default `0.0.0.0:8883`, `0.0.0.0:{HttpSettings__Port}`, `0.0.0.0:{AmqpSettings__Port}`) |
//! | `VERGE_HUB_UPSTREAM_PORT`, `VERGE_HUB_UPSTREAM_AMQP_PORT`, `VERGE_HUB_UPSTREAM_HTTPS_PORT` | the cloud's ports (8883, 5671, 443), for a self-hosted verge-cloud |
//!
//! The upstream is the IoT hub of `IOTEDGE_IOTHUBHOSTNAME`, trusted through
//! the system's CA certificates and verged's trust bundle. Names match as
//! .NET configuration matches them: case-insensitively, `:` or `__` between
//! sections. Every other edgeHub variable present is reported at start as
//! not applied, with why ([`AzureEnv::report`]) — never silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::identity::EdgeEnv;

/// edgeHub variables Verge does not apply, with the reason an operator reads.
const NOT_APPLIED: &[(&str, &str)] = &[
    (
        "OptimizeForPerformance",
        "RocksDB tuning; Verge's store has no such knob",
    ),
    (
        "UsePersistentStorage",
        "Verge always stores messages durably",
    ),
    ("BackupFolder", "no in-memory store to back up"),
    (
        "EnableNonPersistentStorageBackup",
        "no in-memory store to back up",
    ),
    (
        "MessageCleanupIntervalSecs",
        "expired messages are dropped as queues are read",
    ),
    (
        "CheckEntireQueueOnCleanup",
        "expired messages are dropped as queues are read",
    ),
    ("RocksDB_MaxTotalWalSize", "Verge's store is not RocksDB"),
    (
        "RocksDB_MaxManifestFileSize",
        "Verge's store is not RocksDB",
    ),
    ("RocksDB_MaxOpenFiles", "Verge's store is not RocksDB"),
    ("Storage_LogLevel", "use RuntimeLogLevel or RUST_LOG"),
    (
        "ConnectivityCheckFrequencySecs",
        "the upstream link's keep-alive detects outages",
    ),
    (
        "CloudOperationTimeoutSecs",
        "upstream timeouts are fixed (ack 30 s)",
    ),
    ("MessageAckTimeoutSecs", "fixed at 30 s"),
    (
        "MaxConnectedClients",
        "connection caps come from RLIMIT_NOFILE",
    ),
    ("MinTwinSyncPeriodSecs", "twins sync on every change"),
    (
        "ReportedPropertiesSyncFrequencySecs",
        "reported patches go up as they come",
    ),
    (
        "DeviceScopeCacheRefreshDelaySecs",
        "the scope refreshes on a miss at most every 10 s",
    ),
    (
        "AuthenticationMode",
        "Verge authenticates from the device scope (Scope)",
    ),
    ("CacheTokens", "tokens are checked on every CONNECT"),
    (
        "EncryptTwinStore",
        "twins are stored in files only the hub's user can read",
    ),
    ("SslProtocols", "TLS 1.2 and 1.3 always"),
    ("UpstreamFanOutFactor", "one upstream link per sender"),
    ("MqttSettings__Enabled", "MQTT is always served"),
    ("HttpSettings__Enabled", "HTTPS is always served"),
    (
        "SendRuntimeQualityTelemetry",
        "Verge sends no runtime quality telemetry",
    ),
    ("experimentalFeatures__enabled", "no experimental features"),
    (
        "experimentalFeatures__mqttBrokerEnabled",
        "no MQTT broker yet",
    ),
    ("NestedEdgeEnabled", "nested edges are not supported yet"),
];

/// Variables applied whether or not a config file is given (the log level,
/// and the metrics listener, which the environment overrides; `metrics.rs`).
const ALWAYS_APPLIED: &[&str] = &[
    "RuntimeLogLevel",
    "UpstreamProtocol",
    "https_proxy",
    "MetricsEnabled",
    "Metrics__Listener__MetricsEnabled",
    "Metrics__Listener__Host",
    "Metrics__Listener__Port",
    "Metrics__Listener__Suffix",
];

/// Variables this module applies (see the module docs).
const APPLIED: &[&str] = &[
    "storageFolder",
    "MaxUpstreamBatchSize",
    "DeviceScopeCacheRefreshRateSecs",
    "HttpSettings__Port",
    "VERGE_HUB_LISTEN_MQTT",
    "VERGE_HUB_LISTEN_HTTPS",
    "CloudConnectionIdleTimeoutSecs",
    "CloseCloudConnectionOnIdleTimeout",
    "VERGE_HUB_UPSTREAM_PORT",
    "VERGE_HUB_UPSTREAM_AMQP_PORT",
    "VERGE_HUB_UPSTREAM_HTTPS_PORT",
];

/// The module environment, looked up as .NET configuration does.
#[derive(Debug, Clone, Default)]
pub struct AzureEnv {
    /// normalised name → (name as given, value)
    vars: BTreeMap<String, (String, String)>,
}

/// `Metrics:Listener:Port` and `metrics__listener__port` are one name.
fn normalise(name: &str) -> String {
    name.replace(':', "__").to_ascii_lowercase()
}

impl AzureEnv {
    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// From name/value pairs (tests).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| {
                let k = k.into();
                (normalise(&k), (k, v.into()))
            })
            .collect();
        Self { vars }
    }

    /// The value of `name`, blank values counting as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(&normalise(name))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.get(name)
            .map(|v| v.parse::<T>().map_err(|e| format!("{name}={v:?}: {e}")))
            .transpose()
    }

    /// The edgeHub variables present: (applied, not applied with why), each
    /// as `name=value`, so the start log says what the manifest's env did.
    /// With a config `file`, only [`ALWAYS_APPLIED`] apply.
    pub fn report(&self, file: Option<&Path>) -> (Vec<String>, Vec<String>) {
        let shown = |name: &str| {
            self.vars
                .get(&normalise(name))
                .map(|(k, v)| format!("{k}={v}"))
        };
        let mut applied = Vec::new();
        let mut ignored = Vec::new();
        for name in ALWAYS_APPLIED.iter().chain(APPLIED) {
            match (shown(name), file) {
                (Some(s), Some(f)) if !ALWAYS_APPLIED.contains(name) => {
                    ignored.push(format!(
                        "{s} (the hub's config file {} decides)",
                        f.display()
                    ));
                }
                (Some(s), _) => applied.push(s),
                (None, _) => {}
            }
        }
        ignored.extend(
            NOT_APPLIED
                .iter()
                .filter_map(|(n, why)| shown(n).map(|s| format!("{s} ({why})"))),
        );
        (applied, ignored)
    }

    /// Logs [`Self::report`]: applied at info, not applied as a warning.
    pub fn log_report(&self, file: Option<&Path>) {
        let (applied, ignored) = self.report(file);
        if !applied.is_empty() {
            tracing::info!(settings = %applied.join(", "), "edgeHub settings applied");
        }
        if !ignored.is_empty() {
            tracing::warn!(settings = %ignored.join("; "), "edgeHub settings Verge does not apply");
        }
    }
}

/// Where the upstream CA bundle (system roots + verged's trust bundle) is
/// kept, in the hub's storage directory.
pub fn upstream_ca_path(storage_dir: &Path) -> PathBuf {
    storage_dir.join("upstream-ca.pem")
}

/// The system's CA certificates (Debian's path; others are tried in turn).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The configuration of a hub that verged runs with no file (see the
/// module docs). The upstream CA file it names is written at start by
/// [`write_upstream_ca`].
pub fn config_without_file(edge: EdgeEnv, env: &AzureEnv) -> Result<Config, String> {
    let storage_dir = match env.get("storageFolder") {
        Some(f) => PathBuf::from(f).join("edgeHub"),
        None => {
            let dir = std::env::temp_dir().join("edgeHub");
            tracing::warn!(dir = %dir.display(),
                "storageFolder is not set: messages, twins and sessions are kept in the temp \
                 directory (in a container, lost with it); set storageFolder and bind-mount a host directory");
            dir
        }
    };
    let https_port: u16 = env.parse("HttpSettings__Port")?.unwrap_or(443);
    let mqtt = env.get("VERGE_HUB_LISTEN_MQTT").unwrap_or("0.0.0.0:8883");
    let https = env
        .get("VERGE_HUB_LISTEN_HTTPS")
        .map_or_else(|| format!("0.0.0.0:{https_port}"), str::to_owned);
    let mut upstream = toml::Table::new();
    upstream.insert("hostname".into(), edge.iothub_hostname.clone().into());
    let port: u16 = env.parse("VERGE_HUB_UPSTREAM_PORT")?.unwrap_or(8883);
    upstream.insert("port".into(), i64::from(port).into());
    let amqp: u16 = env.parse("VERGE_HUB_UPSTREAM_AMQP_PORT")?.unwrap_or(5671);
    upstream.insert("amqp_port".into(), i64::from(amqp).into());
    let cloud_https: u16 = env.parse("VERGE_HUB_UPSTREAM_HTTPS_PORT")?.unwrap_or(443);
    upstream.insert("https_port".into(), i64::from(cloud_https).into());
    upstream.insert(
        "ca_file".into(),
        upstream_ca_path(&storage_dir).display().to_string().into(),
    );
    // edgeHub's default upstream protocol; `UpstreamProtocol` overrides it
    // (upstream/transport.rs). A config file keeps Verge's default, MQTT.
    upstream.insert(
        "protocol".into(),
        verge_dial::protocol::EDGE_DEFAULT.to_string().into(),
    );
    if let Some(n) = env.parse::<i64>("MaxUpstreamBatchSize")? {
        upstream.insert("batch_size".into(), n.into());
    }
    if let Some(n) = env.parse::<i64>("DeviceScopeCacheRefreshRateSecs")? {
        upstream.insert("scope_refresh_secs".into(), n.into());
    }
    if let Some(n) = env.parse::<i64>("CloudConnectionIdleTimeoutSecs")? {
        upstream.insert("idle_timeout_secs".into(), n.into());
    }
    if let Some(b) = env.parse::<bool>("CloseCloudConnectionOnIdleTimeout")? {
        upstream.insert("close_on_idle".into(), b.into());
    }
    let mut listen = toml::Table::new();
    listen.insert("mqtt".into(), mqtt.into());
    listen.insert("https".into(), https.into());
    let amqp_on = match env.get("AmqpSettings__Enabled") {
        None => true,
        Some(v) => v
            .parse::<bool>()
            .map_err(|_| format!("AmqpSettings__Enabled={v:?}: expected true or false"))?,
    };
    if amqp_on {
        let amqp_port: u16 = env.parse("AmqpSettings__Port")?.unwrap_or(5671);
        let amqps = env
            .get("VERGE_HUB_LISTEN_AMQPS")
            .map_or_else(|| format!("0.0.0.0:{amqp_port}"), str::to_owned);
        listen.insert("amqps".into(), amqps.into());
    }
    let mut table = toml::Table::new();
    table.insert(
        "storage_dir".into(),
        storage_dir.display().to_string().into(),
    );
    table.insert("listen".into(), listen.into());
    table.insert("upstream".into(), upstream.into());
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    let cfg = Config::from_toml(&text).map_err(|e| format!("from the module environment: {e}"))?;
    cfg.with_edge_env(Some(edge))
}

/// Writes the upstream CA bundle of a file-less hub: the system's CA
/// certificates (Azure IoT Hub's roots) and verged's trust bundle (the
/// edge CA and `trust_bundle_cert`: a self-hosted cloud's CA). If verged
/// cannot be asked, the last bundle written is used.
pub async fn write_upstream_ca(cfg: &Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (Some(edge), Some(up)) = (&cfg.edge, &cfg.upstream) else {
        return Ok(());
    };
    let client = verge_workload::client::WorkloadClient::new(
        edge.workload_socket.clone(),
        &edge.module_id,
        &edge.generation_id,
    );
    let bundle = match client.trust_bundle().await {
        Ok(b) => b,
        Err(e) if up.ca_file.is_file() => {
            tracing::warn!(error = %e, file = %up.ca_file.display(),
                "verged's trust bundle is unavailable; using the one kept from before");
            return Ok(());
        }
        Err(e) => return Err(anyhow::anyhow!("fetching verged's trust bundle: {e}")),
    };
    let mut pem = String::new();
    for f in SYSTEM_CA_FILES {
        if let Ok(text) = tokio::fs::read_to_string(f).await {
            pem.push_str(&text);
            pem.push('\n');
            break;
        }
    }
    pem.push_str(&bundle);
    verge_files::create_private_dir(&cfg.storage_dir)
        .with_context(|| format!("creating {}", cfg.storage_dir.display()))?;
    verge_files::write_atomic_async(up.ca_file.clone(), pem.into_bytes())
        .await
        .with_context(|| format!("writing {}", up.ca_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> EdgeEnv {
        EdgeEnv::from_lookup(|k| {
            Some(
                match k {
                    "IOTEDGE_WORKLOADURI" => "unix:///run/verge/edgeHub.sock",
                    "IOTEDGE_MODULEID" => "$edgeHub",
                    "IOTEDGE_MODULEGENERATIONID" => "g1",
                    "IOTEDGE_DEVICEID" => "edge1",
                    "IOTEDGE_IOTHUBHOSTNAME" => "hub.example.net",
                    "EdgeDeviceHostName" => "edge1.local",
                    _ => return None,
                }
                .to_owned(),
            )
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn azure_manifest_env_makes_the_whole_config() {
        let env = AzureEnv::from_pairs([
            ("STORAGEFOLDER", "/iotedge/storage"),
            ("MaxUpstreamBatchSize", "20"),
            ("httpSettings:port", "8443"),
            ("OptimizeForPerformance", "false"),
            ("PATH", "/bin"),
        ]);
        let c = config_without_file(edge(), &env).unwrap();
        assert_eq!(c.storage_dir, Path::new("/iotedge/storage/edgeHub"));
        assert_eq!(c.listen.mqtt.to_string(), "0.0.0.0:8883");
        assert_eq!(c.listen.https.to_string(), "0.0.0.0:8443");
        assert_eq!(
            c.listen.amqps.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:5671")
        );
        let up = c.upstream.as_ref().unwrap();
        assert_eq!(up.hostname, "hub.example.net");
        assert_eq!((up.port, up.https_port, up.batch_size), (8883, 443, 20));
        // edgeHub's default protocol, on IoT Hub's AMQP port.
        assert_eq!(up.protocol, Some(verge_dial::UpstreamProtocol::Amqp));
        assert_eq!(up.amqp_port, 5671);
        assert_eq!(
            up.ca_file,
            Path::new("/iotedge/storage/edgeHub/upstream-ca.pem")
        );
        assert_eq!(c.device_id, "edge1");
        assert!(c.edge.is_some() && c.tls.is_none());
        let (applied, ignored) = env.report(None);
        assert_eq!(
            applied,
            [
                "STORAGEFOLDER=/iotedge/storage",
                "MaxUpstreamBatchSize=20",
                "httpSettings:port=8443"
            ]
        );
        assert_eq!(ignored.len(), 1);
        assert!(
            ignored[0].starts_with("OptimizeForPerformance=false (RocksDB"),
            "{ignored:?}"
        );
        // With a config file, the file decides (but for the log level).
        let (applied, ignored) = env.report(Some(Path::new("/etc/hub.toml")));
        assert!(applied.is_empty(), "{applied:?}");
        assert_eq!(ignored.len(), 4, "{ignored:?}");
        assert!(ignored[0].ends_with("(the hub's config file /etc/hub.toml decides)"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env = AzureEnv::from_pairs([("MaxUpstreamBatchSize", "lots")]);
        let e = config_without_file(edge(), &env).unwrap_err();
        assert!(e.contains("MaxUpstreamBatchSize=\"lots\""), "{e}");
        let env = AzureEnv::from_pairs([("MaxUpstreamBatchSize", "5000")]);
        let e = config_without_file(edge(), &env).unwrap_err();
        assert!(e.contains("batch_size"), "{e}");
        let env = AzureEnv::from_pairs([("VERGE_HUB_LISTEN_MQTT", "nowhere")]);
        assert!(config_without_file(edge(), &env).is_err());
    }

    #[test]
    fn no_storage_folder_means_the_temp_directory() {
        let c = config_without_file(edge(), &AzureEnv::default()).unwrap();
        assert_eq!(c.storage_dir, std::env::temp_dir().join("edgeHub"));
        assert_eq!(c.listen.https.to_string(), "0.0.0.0:443");
        let off = AzureEnv::from_pairs([("amqpSettings__enabled", "false")]);
        assert_eq!(
            config_without_file(edge(), &off).unwrap().listen.amqps,
            None
        );
        let bad = AzureEnv::from_pairs([("AmqpSettings__Enabled", "nope")]);
        assert!(config_without_file(edge(), &bad).is_err());
    }
}
