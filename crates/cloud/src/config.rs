//! verge-cloud's configuration: a TOML file, overridable by flags.
//!
//! ```toml
//! data_dir = "/var/lib/verge-cloud"   # required (or --data-dir)
//! listen = "0.0.0.0:8443"             # service API (HTTPS); default 127.0.0.1:8443
//! mqtt_listen = "0.0.0.0:8883"        # device endpoint (MQTT/TLS); default 0.0.0.0:8883
//! amqps_listen = "0.0.0.0:5671"       # device endpoint over AMQP/TLS; default: none (AMQP
//!                                     # over WebSocket is always on the HTTPS listener)
//! hostname = "cloud.example.net"      # SAS audience host; default: the listen address
//!
//! [service]
//! policy_name = "iothubowner"         # default
//! policy_key = "<base64>"             # default: generated once into data_dir/service-policy.key
//!
//! [dps]                               # the provisioning service (crate::dps)
//! enabled = true                      # default
//! id_scope = "0ne0001A2B3"            # default: generated once into data_dir/dps/id_scope
//! iothub_hostname = "hub.example.net" # assigned hub; default: hostname without its port
//!
//! [tls]                               # both or neither; default: generated CA in data_dir/tls
//! cert = "/etc/verge-cloud/server.pem"
//! key = "/etc/verge-cloud/server.key"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use verge_core::SharedAccessKey;

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or types (the message names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message (includes the key and line).
        message: String,
    },
    /// A value breaks a rule.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// Why.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<String>,
    /// Device endpoint (MQTT) listen address.
    pub mqtt_listen: Option<String>,
    /// Device endpoint over AMQPS listen address.
    pub amqps_listen: Option<String>,
    /// Hub host name.
    pub hostname: Option<String>,
    /// `[service]`.
    #[serde(default)]
    pub service: ServiceSection,
    /// `[tls]`.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[dps]`.
    #[serde(default)]
    pub dps: DpsSection,
}

/// `[dps]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpsSection {
    /// Serve DPS (default true).
    pub enabled: Option<bool>,
    /// The ID scope.
    pub id_scope: Option<String>,
    /// The hub host name devices are assigned to.
    pub iothub_hostname: Option<String>,
}

/// `[service]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Policy name (default `iothubowner`).
    pub policy_name: Option<String>,
    /// Policy key, base64.
    pub policy_key: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain PEM.
    pub cert: Option<PathBuf>,
    /// Private key PEM.
    pub key: Option<PathBuf>,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--mqtt-listen`.
    pub mqtt_listen: Option<String>,
    /// `--amqps-listen`.
    pub amqps_listen: Option<String>,
    /// `--hostname`.
    pub hostname: Option<String>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Device endpoint (MQTT over TLS) listen address.
    pub mqtt_listen: SocketAddr,
    /// Device endpoint over AMQPS, if served (IoT Hub's 5671).
    pub amqps_listen: Option<SocketAddr>,
    /// Hub host name; `None` means "the bound address" (known after bind).
    pub hostname: Option<String>,
    /// Policy name.
    pub policy_name: String,
    /// Policy key from the file, if given.
    pub policy_key: Option<SharedAccessKey>,
    /// TLS cert file.
    pub tls_cert: Option<PathBuf>,
    /// TLS key file.
    pub tls_key: Option<PathBuf>,
    /// `[dps]` as written (validated).
    pub dps: DpsSection,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Default device endpoint address: IoT Hub's MQTT port, on every interface
/// (the Azure device SDKs cannot dial another port).
pub const DEFAULT_MQTT_LISTEN: &str = "0.0.0.0:8883";

impl Config {
    /// Reads `path` (if any) and applies `over`.
    pub fn load(path: Option<&Path>, over: Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_owned(),
                    message: e.to_string(),
                })?
            }
        };
        Self::from_file(file, over)
    }

    /// Validates a parsed file plus overrides.
    pub fn from_file(file: FileConfig, over: Overrides) -> Result<Self, ConfigError> {
        let data_dir = over
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Invalid {
                key: "data_dir",
                message: "is required (or pass --data-dir)".into(),
            })?;
        let listen_text = over
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|e| ConfigError::Invalid {
            key: "listen",
            message: format!("{listen_text:?} is not an IP:port address ({e})"),
        })?;
        let mqtt_text = over
            .mqtt_listen
            .or(file.mqtt_listen)
            .unwrap_or_else(|| DEFAULT_MQTT_LISTEN.to_owned());
        let mqtt_listen = mqtt_text.parse().map_err(|e| ConfigError::Invalid {
            key: "mqtt_listen",
            message: format!("{mqtt_text:?} is not an IP:port address ({e})"),
        })?;
        let amqps_listen = match over.amqps_listen.or(file.amqps_listen) {
            None => None,
            Some(t) => Some(t.parse().map_err(|e| ConfigError::Invalid {
                key: "amqps_listen",
                message: format!("{t:?} is not an IP:port address ({e})"),
            })?),
        };
        let hostname = over.hostname.or(file.hostname);
        if let Some(h) = &hostname
            && (h.is_empty() || h.contains('/') || h.chars().any(char::is_whitespace))
        {
            return Err(ConfigError::Invalid {
                key: "hostname",
                message: format!("{h:?} is not a host name"),
            });
        }
        let policy_name = file
            .service
            .policy_name
            .unwrap_or_else(|| "iothubowner".to_owned());
        if policy_name.is_empty() || policy_name.contains(['&', '=', ';']) {
            return Err(ConfigError::Invalid {
                key: "service.policy_name",
                message: format!("{policy_name:?} is not a valid policy name"),
            });
        }
        let policy_key = file
            .service
            .policy_key
            .map(|k| {
                SharedAccessKey::from_base64(&k).map_err(|e| ConfigError::Invalid {
                    key: "service.policy_key",
                    message: e.to_string(),
                })
            })
            .transpose()?;
        if file.tls.cert.is_some() != file.tls.key.is_some() {
            return Err(ConfigError::Invalid {
                key: "tls",
                message: "tls.cert and tls.key must be given together".into(),
            });
        }
        if let Some(scope) = &file.dps.id_scope
            && !crate::dps::valid_id_scope(scope)
        {
            return Err(ConfigError::Invalid {
                key: "dps.id_scope",
                message: format!("{scope:?} must be 1-64 ASCII letters or digits"),
            });
        }
        if let Some(h) = &file.dps.iothub_hostname
            && (h.is_empty() || h.contains('/') || h.chars().any(char::is_whitespace))
        {
            return Err(ConfigError::Invalid {
                key: "dps.iothub_hostname",
                message: format!("{h:?} is not a host name"),
            });
        }
        Ok(Self {
            dps: file.dps,
            data_dir,
            listen,
            mqtt_listen,
            amqps_listen,
            hostname,
            policy_name,
            policy_key,
            tls_cert: file.tls.cert,
            tls_key: file.tls.key,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        let f: FileConfig = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: "t".into(),
            message: e.to_string(),
        })?;
        Config::from_file(f, Overrides::default())
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("listen = \"x\"").unwrap_err().to_string();
        assert!(e.contains("data_dir"), "{e}");
        let e = parse("data_dir = \"/d\"\nlisten = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`listen`"), "{e}");
        let e = parse("data_dir = \"/d\"\nmqtt_listen = \"8883\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mqtt_listen`"), "{e}");
        let e = parse("data_dir = \"/d\"\n[service]\npolicy_key = \"!!\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service.policy_key"), "{e}");
        let e = parse("data_dir = \"/d\"\nbogus = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("data_dir = \"/d\"\n[tls]\ncert = \"/c\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls"), "{e}");
        let ok = parse("data_dir = \"/d\"\nhostname = \"h.example\"").unwrap();
        assert_eq!(ok.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(ok.mqtt_listen.to_string(), DEFAULT_MQTT_LISTEN);
        assert_eq!(ok.policy_name, "iothubowner");
    }
}
