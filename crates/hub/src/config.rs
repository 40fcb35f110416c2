//! The hub's TOML configuration file.
//!
//! ```toml
//! iothub_hostname = "myhub.azure-devices.net"
//! hostname = "localhost"            # the gateway name clients dial (also a valid SAS audience host)
//! device_id = "edge1"
//! device_key = "<base64>"          # module keys are derived from it
//! storage_dir = "/var/lib/verge/hub"
//! routes_file = "/etc/verge/edgehub.json"   # `$edgeHub` desired properties, polled (limits.routes_poll_ms)
//! twins_file = "/etc/verge/twins.json"      # optional: {"edge1/modA": {desired…}, "leaf1": {…}}
//!
//! [listen]
//! mqtt = "0.0.0.0:8883"
//! https = "0.0.0.0:443"
//!
//! [tls]
//! cert = "/etc/verge/hub.pem"   # server chain, leaf first
//! key = "/etc/verge/hub.key"
//!
//! [modules]      # module id -> generation id
//! filter = "637000000000000001"
//!
//! [devices]      # downstream device id -> base64 key
//! leaf1 = "<base64>"
//!
//! [upstream]     # optional: without it nothing is sent to the cloud
//! hostname = "myhub.azure-devices.net"   # dialled; also the TLS server name
//! port = 8883
//! ca_file = "/etc/ssl/certs/ca-certificates.crt"   # the cloud's CA(s), PEM
//! reconnect_ms = 5000       # between connection attempts (at most 5000)
//! batch_size = 10           # messages read from the store per batch
//! keep_alive_secs = 30      # MQTT keep-alive; a silent link is down after 1.5×
//! ack_timeout_secs = 30     # PUBACK wait before the link is dropped and the batch resent
//! ```
//!
//! Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The IoT hub's hostname (the `HostName` of connection strings, the audience host of SAS tokens).
    pub iothub_hostname: String,
    /// This hub's own hostname (the `GatewayHostName` clients dial); also accepted as audience host.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// The edge device's id.
    pub device_id: String,
    /// The edge device's symmetric key, base64.
    pub device_key: String,
    /// Known module identities: module id → generation id.
    #[serde(default)]
    pub modules: BTreeMap<String, String>,
    /// Downstream (leaf) devices: device id → base64 key.
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
    /// TLS server certificate and key.
    pub tls: TlsConfig,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Directory for the message store, sessions and twins.
    pub storage_dir: PathBuf,
    /// JSON file with the `$edgeHub` desired properties (routes); polled, and
    /// applied live when it changes. Without it the last accepted document
    /// (kept in the `$edgeHub` twin) is used.
    #[serde(default)]
    pub routes_file: Option<PathBuf>,
    /// JSON file with desired properties per identity (`{"d/m": {…}}`), polled for changes.
    #[serde(default)]
    pub twins_file: Option<PathBuf>,
    /// Protocol limits and timers.
    #[serde(default)]
    pub limits: Limits,
    /// The link to the cloud IoT hub; `None` = messages routed to
    /// `$upstream` stay in the store.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
}

/// The upstream IoT hub (Azure IoT Hub or verge-cloud), reached over
/// MQTT 3.1.1/TLS with one connection per sending identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host to dial, also the TLS server name checked against the cloud's
    /// certificate. SAS audiences and usernames use `iothub_hostname`.
    pub hostname: String,
    /// MQTT over TLS port (default 8883).
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    /// PEM file with the CA certificate(s) the cloud's certificate must chain to.
    pub ca_file: PathBuf,
    /// Milliseconds between connection attempts of a link that is down
    /// (default and maximum 5000, so a returning link is found within 5 s).
    #[serde(default = "default_reconnect_ms")]
    pub reconnect_ms: u64,
    /// Messages read from the store and published per batch (default 10,
    /// edgeHub's `MaxUpstreamBatchSize`); also each link's inflight bound.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// MQTT keep-alive, seconds (default 30): a silent link is declared down
    /// after 1.5 × this.
    #[serde(default = "default_upstream_keep_alive")]
    pub keep_alive_secs: u16,
    /// Seconds the cloud has to PUBACK a message before the link is dropped
    /// and the batch resent (default 30, edgeHub's `MessageAckTimeoutSecs`).
    #[serde(default = "default_upstream_ack_timeout")]
    pub ack_timeout_secs: u64,
}

/// TLS server identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM file with the server's private key.
    pub key: PathBuf,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// MQTT over TLS (default `0.0.0.0:8883`).
    #[serde(default = "default_mqtt")]
    pub mqtt: SocketAddr,
    /// HTTPS (direct methods, `$edgeHub` updates, MQTT over WebSocket on
    /// `/$iothub/websocket`), default `0.0.0.0:443`.
    #[serde(default = "default_https")]
    pub https: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            mqtt: default_mqtt(),
            https: default_https(),
        }
    }
}

/// Protocol limits and timers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Seconds a client has to complete TLS and send CONNECT (default 60).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Unacknowledged QoS 1 publishes per client (default 32).
    #[serde(default = "default_inflight")]
    pub max_inflight: usize,
    /// Largest MQTT packet accepted, bytes (default 256 KiB + 8 KiB for topic and header).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// How often the twins file is checked for changes, milliseconds (default 1000).
    #[serde(default = "default_twins_poll")]
    pub twins_poll_ms: u64,
    /// How often the routes file is checked for changes, milliseconds (default 1000).
    #[serde(default = "default_twins_poll")]
    pub routes_poll_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout_secs: default_connect_timeout(),
            max_inflight: default_inflight(),
            max_packet_bytes: default_max_packet(),
            twins_poll_ms: default_twins_poll(),
            routes_poll_ms: default_twins_poll(),
        }
    }
}

fn default_hostname() -> String {
    "localhost".into()
}
fn default_mqtt() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8883))
}
fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_connect_timeout() -> u64 {
    60
}
fn default_inflight() -> usize {
    32
}
fn default_max_packet() -> usize {
    verge_core::message::MAX_MESSAGE_SIZE + 8 * 1024
}
fn default_twins_poll() -> u64 {
    1000
}
fn default_upstream_port() -> u16 {
    8883
}
fn default_reconnect_ms() -> u64 {
    5000
}
fn default_batch_size() -> usize {
    10
}
fn default_upstream_keep_alive() -> u16 {
    30
}
fn default_upstream_ack_timeout() -> u64 {
    30
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid configuration {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the key).
        message: String,
    },
}

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    fn validate(&self) -> Result<(), String> {
        verge_core::DeviceId::new(self.device_id.as_str())
            .map_err(|e| format!("device_id: {e}"))?;
        verge_core::SharedAccessKey::from_base64(&self.device_key)
            .map_err(|e| format!("device_key: {}", e.reason))?;
        for m in self.modules.keys() {
            verge_core::ModuleId::new(m.as_str()).map_err(|e| format!("modules.{m}: {e}"))?;
        }
        for (d, k) in &self.devices {
            verge_core::DeviceId::new(d.as_str()).map_err(|e| format!("devices.{d}: {e}"))?;
            verge_core::SharedAccessKey::from_base64(k)
                .map_err(|e| format!("devices.{d}: {}", e.reason))?;
        }
        if self.limits.max_inflight == 0 {
            return Err("limits.max_inflight must be at least 1".into());
        }
        if let Some(up) = &self.upstream {
            if up.hostname.is_empty() {
                return Err("upstream.hostname must not be empty".into());
            }
            if !(10..=5000).contains(&up.reconnect_ms) {
                return Err("upstream.reconnect_ms must be between 10 and 5000".into());
            }
            if !(1..=1000).contains(&up.batch_size) {
                return Err("upstream.batch_size must be between 1 and 1000".into());
            }
            if up.keep_alive_secs < 5 {
                return Err("upstream.keep_alive_secs must be at least 5".into());
            }
            if up.ack_timeout_secs == 0 {
                return Err("upstream.ack_timeout_secs must be at least 1".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
iothub_hostname = "hub.example"
device_id = "edge1"
device_key = "AAAAAAAAAAAAAAAAAAAAAA=="
storage_dir = "/tmp/x"
[tls]
cert = "c.pem"
key = "k.pem"
[modules]
filter = "1"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.listen.mqtt.port(), 8883);
        assert_eq!(c.listen.https.port(), 443);
        assert_eq!(c.modules.get("filter").map(String::as_str), Some("1"));
        assert_eq!(c.hostname, "localhost");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml(&format!("bogus_key = 1\n{BASE}")).unwrap_err();
        assert!(e.contains("bogus_key"), "{e}");
        let e = Config::from_toml(&BASE.replace("[tls]", "[tls]\nextra = 2")).unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn upstream_table() {
        assert!(Config::from_toml(BASE).unwrap().upstream.is_none());
        let text = format!("{BASE}[upstream]\nhostname = \"cloud\"\nca_file = \"ca.pem\"\n");
        let up = Config::from_toml(&text).unwrap().upstream.unwrap();
        assert_eq!((up.port, up.reconnect_ms, up.batch_size), (8883, 5000, 10));
        let e = Config::from_toml(&format!("{text}bogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml(&format!("{text}reconnect_ms = 6000\n")).unwrap_err();
        assert!(e.contains("reconnect_ms"), "{e}");
        let e = Config::from_toml(&format!("{text}batch_size = 0\n")).unwrap_err();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn bad_key_is_refused() {
        let e = Config::from_toml(&BASE.replace("AAAAAAAAAAAAAAAAAAAAAA==", "!!")).unwrap_err();
        assert!(e.contains("device_key"), "{e}");
    }
}
