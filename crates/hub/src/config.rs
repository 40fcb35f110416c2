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
    fn bad_key_is_refused() {
        let e = Config::from_toml(&BASE.replace("AAAAAAAAAAAAAAAAAAAAAA==", "!!")).unwrap_err();
        assert!(e.contains("device_key"), "{e}");
    }
}
