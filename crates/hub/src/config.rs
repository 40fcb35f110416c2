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
//! [limits]     # optional; connection caps default to shares of RLIMIT_NOFILE
//! connect_timeout_secs = 60      # TLS handshake + CONNECT
//! max_mqtt_connections = 512
//! max_https_connections = 256
//! max_connections_per_ip = 256   # per port
//! http_timeout_secs = 30         # HTTPS request head / idle / stalled body
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
//! [workload]     # optional: timers of the edge-environment mode (below)
//! identities_refresh_secs = 300    # module identities fetched from verged this often
//! identities_miss_secs = 10        # …and on an unknown/refused module token: the first at once, later ones at most this often
//! cert_retry_max_secs = 60         # longest back-off between failed certificate renewals
//!
//! [store]        # optional: the message store's free-space floor
//! min_free_bytes = 67108864        # appends refused below this much free space (0 = no check)…
//! min_free_percent = 10            # …or below this share of the volume, if less (small volumes)
//!
//! [metrics]      # optional: Prometheus text on http://<listen>/<suffix>
//! enabled = true                   # MetricsEnabled (env) overrides
//! listen = "0.0.0.0:9600"          # default: the MQTT listener's IP, port 9600; Metrics__Listener__Host/Port override
//! suffix = "metrics"               # Metrics__Listener__Suffix overrides
//!
//! [upstream]     # optional: without it nothing is sent to the cloud
//! hostname = "myhub.azure-devices.net"   # dialled; also the TLS server name
//! port = 8883              # MQTT over TLS
//! amqp_port = 5671         # AMQP over TLS (protocol = "Amqp")
//! ca_file = "/etc/ssl/certs/ca-certificates.crt"   # the cloud's CA(s), PEM
//! reconnect_ms = 5000       # between connection attempts (at most 5000)
//! batch_size = 100          # messages read from the store per batch
//! keep_alive_secs = 30      # MQTT keep-alive; a silent link is down after 1.5×
//! ack_timeout_secs = 30     # PUBACK wait before the link is dropped and the batch resent
//! idle_timeout_secs = 3600  # an identity's upstream session ends after this long idle
//! close_on_idle = true      #   (its client not connected here); reopened on demand
//! protocol = "Mqtt"         # or Amqp (one connection for all identities), MqttWs / AmqpWs
//!                           # (443, honour https_proxy); env UpstreamProtocol wins
//! ```
//!
//! Unknown keys are errors that name the key.
//!
//! # Config-file mode and edge-environment mode
//!
//! The hub's identities and TLS certificate come from this file (as above),
//! or — when verged runs the hub as its `edgeHub` module — from verged:
//! `main` reads the module environment ([`crate::identity::EdgeEnv`]:
//! `IOTEDGE_WORKLOADURI`, `IOTEDGE_MODULEID`, `IOTEDGE_MODULEGENERATIONID`,
//! `IOTEDGE_DEVICEID`, `IOTEDGE_IOTHUBHOSTNAME`, and `EdgeDeviceHostName`
//! or `IOTEDGE_GATEWAYHOSTNAME`) and [`Config::with_edge_env`] uses it for
//! whatever the file leaves out:
//!
//! * no `[tls]` table: the server certificate is issued by verged's workload
//!   API for the gateway hostname and renewed without a restart;
//! * no `device_key`: module identities and keys come from verged
//!   (`GET /modules/$edgeHub/identities`), cached under `storage_dir`;
//! * no `iothub_hostname` / `device_id`: taken from the environment.
//!
//! With `[upstream]`, leaf devices that the cloud lists as children of this
//! edge device are fetched over HTTPS (`upstream.https_port`) and cached too
//! (see [`crate::identity_scope`]); `[devices]` entries are added to them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The IoT hub's hostname (the `HostName` of connection strings, the audience host of SAS tokens).
    /// May be left out in edge-environment mode.
    #[serde(default)]
    pub iothub_hostname: String,
    /// This hub's own hostname (the `GatewayHostName` clients dial); also accepted as audience host.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// The edge device's id. May be left out in edge-environment mode.
    #[serde(default)]
    pub device_id: String,
    /// The edge device's symmetric key, base64. Empty or absent: module
    /// identities come from verged (edge-environment mode).
    #[serde(default)]
    pub device_key: String,
    /// Known module identities: module id → generation id.
    #[serde(default)]
    pub modules: BTreeMap<String, String>,
    /// Downstream (leaf) devices: device id → base64 key.
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
    /// TLS server certificate and key; absent: issued by verged's workload API.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
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
    /// The message store's free-space floor (its size limit is
    /// `storeLimits.maxSizeBytes` of the `$edgeHub` desired properties).
    #[serde(default)]
    pub store: StoreSettings,
    /// The link to the cloud IoT hub; `None` = messages routed to
    /// `$upstream` stay in the store.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// PEM file of the CA certificates X.509 leaf devices may chain to (the
    /// edge's trust bundle); absent: verged's trust bundle in the edge
    /// environment, else no CA-signed leaf is accepted.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// Timers of the edge-environment mode.
    #[serde(default)]
    pub workload: WorkloadConfig,
    /// The Prometheus endpoint (`crate::metrics`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The module environment, when the hub runs as verged's `edgeHub`
    /// module and uses it (set by [`Config::with_edge_env`], not from TOML).
    #[serde(skip)]
    pub edge: Option<crate::identity::EdgeEnv>,
    /// Move a message store that cannot be opened aside and start an empty
    /// one (`verge-hub --salvage`; not from TOML).
    #[serde(skip)]
    pub salvage_store: bool,
}

/// `[workload]`: timers of the edge-environment mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Seconds between fetches of the module identities (default 300).
    #[serde(default = "default_identities_refresh")]
    pub identities_refresh_secs: u64,
    /// Minimum seconds between fetches triggered by an unknown or refused
    /// module token (default 10): a new module is accepted on its retry.
    #[serde(default = "default_identities_miss")]
    pub identities_miss_secs: u64,
    /// Longest back-off between failed server-certificate renewals (default 60).
    #[serde(default = "default_cert_retry_max")]
    pub cert_retry_max_secs: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            identities_refresh_secs: default_identities_refresh(),
            identities_miss_secs: default_identities_miss(),
            cert_retry_max_secs: default_cert_retry_max(),
        }
    }
}

fn default_identities_refresh() -> u64 {
    300
}
fn default_identities_miss() -> u64 {
    10
}
fn default_cert_retry_max() -> u64 {
    60
}
fn default_https_port() -> u16 {
    443
}
fn default_scope_refresh() -> u64 {
    3600
}

/// The upstream IoT hub (Azure IoT Hub or verge-cloud), reached over
/// MQTT 3.1.1 (one connection per sending identity) or AMQP 1.0 (one
/// connection for all), over TLS or WebSocket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host to dial, also the TLS server name checked against the cloud's
    /// certificate. SAS audiences and usernames use `iothub_hostname`.
    pub hostname: String,
    /// MQTT over TLS port (default 8883).
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    /// AMQP over TLS port, for `protocol = "Amqp"` (default 5671).
    #[serde(default = "default_upstream_amqp_port")]
    pub amqp_port: u16,
    /// PEM file with the CA certificate(s) the cloud's certificate must chain to.
    pub ca_file: PathBuf,
    /// Milliseconds between connection attempts of a link that is down
    /// (default and maximum 5000, so a returning link is found within 5 s).
    #[serde(default = "default_reconnect_ms")]
    pub reconnect_ms: u64,
    /// Messages read from the store and published per batch (default 100;
    /// edgeHub's `MaxUpstreamBatchSize` is 10); the drain keeps up to four
    /// batches in flight.
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
    /// HTTPS port of the cloud's service API, where the hub fetches the
    /// identities in its device scope (child devices) (default 443).
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Seconds between device-scope fetches (default 3600, edgeHub's
    /// `DeviceScopeCacheRefreshRateSecs`).
    #[serde(default = "default_scope_refresh")]
    pub scope_refresh_secs: u64,
    /// An identity's upstream session (its AMQP session, or its MQTT
    /// connection) is ended after this many seconds without upstream traffic
    /// while its client is not connected here (default 3600, edgeHub's
    /// `CloudConnectionIdleTimeoutSecs`), and opened again when it has
    /// something to send or its client connects. Never the edge's own.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Whether idle sessions are ended at all (default true, edgeHub's
    /// `CloseCloudConnectionOnIdleTimeout`).
    #[serde(default = "default_true")]
    pub close_on_idle: bool,
    /// `Mqtt` (default), `MqttWs`, `Amqp`, `AmqpWs` (case-insensitive; also
    /// read as `upstream_protocol`); the `UpstreamProtocol` environment
    /// variable overrides it. See [`crate::upstream::transport`].
    #[serde(default, alias = "upstream_protocol")]
    pub protocol: Option<crate::upstream::transport::UpstreamProtocol>,
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
    /// AMQP over TLS (IoT Hub's port is 5671); off when absent. AMQP over
    /// WebSocket (`AMQPWSB10`) is served on the HTTPS listener either way.
    #[serde(default)]
    pub amqps: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            mqtt: default_mqtt(),
            https: default_https(),
            amqps: None,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint (edgeHub's `:9600/metrics`). The
/// environment (`MetricsEnabled`, `Metrics__Listener__Host|Port|Suffix`)
/// overrides these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve metrics (default true, as edgeHub since 1.0.10).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Listen address; default the MQTT listener's IP, port 9600.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The path (default `metrics`).
    #[serde(default = "default_metrics_suffix")]
    pub suffix: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            suffix: default_metrics_suffix(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_metrics_suffix() -> String {
    verge_metrics::DEFAULT_SUFFIX.to_owned()
}

/// `[store]`: when the message store refuses appends for lack of disk
/// space (see `verge_store::StoreConfig::min_free_bytes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Bytes that must stay free on the store's volume (default 64 MiB; 0 = no check).
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
    /// …or this percentage of the volume's size, if less (default 10).
    #[serde(default = "default_min_free_percent")]
    pub min_free_percent: u8,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            min_free_bytes: default_min_free_bytes(),
            min_free_percent: default_min_free_percent(),
        }
    }
}

fn default_min_free_bytes() -> u64 {
    verge_store::StoreConfig::default().min_free_bytes
}
fn default_min_free_percent() -> u8 {
    verge_store::StoreConfig::default().min_free_percent
}

/// Protocol limits and timers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Seconds a client has to complete TLS and send CONNECT (default 60).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Unacknowledged QoS 1 deliveries per client (default 128, the
    /// delivery pump's window: at 32 a busy module's inputs were capped at
    /// 32 per round trip and fell behind what its producers sent).
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
    /// Connections open at once on the MQTT port (default: two thirds of
    /// what `RLIMIT_NOFILE` leaves after a reserve of 256 or a quarter).
    #[serde(default)]
    pub max_mqtt_connections: Option<usize>,
    /// Connections open at once on the HTTPS port (default: the other third).
    #[serde(default)]
    pub max_https_connections: Option<usize>,
    /// Connections open at once from one IP address, per port (default: half
    /// of that port's cap).
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
    /// HTTPS: seconds to send a request head (also the longest idle gap
    /// between requests) and the longest stall of a request body; a response
    /// write stalled twice as long closes the connection (default 30).
    #[serde(default = "default_http_timeout")]
    pub http_timeout_secs: u64,
}

impl Limits {
    /// The listeners' connection caps (MQTT, HTTPS), sized from
    /// `RLIMIT_NOFILE` unless configured, so that together they stay under
    /// it and a flood on one port never starves the other.
    pub fn connection_caps(&self) -> (verge_listen::Limits, verge_listen::Limits) {
        let shares = verge_listen::fds::share(verge_listen::fds::fd_limit(), 256, &[2, 1]);
        let mqtt = self
            .max_mqtt_connections
            .unwrap_or_else(|| shares.first().copied().unwrap_or(1));
        let https = self
            .max_https_connections
            .unwrap_or_else(|| shares.get(1).copied().unwrap_or(1));
        let handshake = std::time::Duration::from_secs(self.connect_timeout_secs);
        let cap = |n: usize| {
            let mut l = verge_listen::Limits::new(n, handshake);
            if let Some(p) = self.max_connections_per_ip {
                l.max_per_peer = p.max(1);
            }
            l
        };
        (cap(mqtt), cap(https))
    }

    /// The AMQP endpoint's deadlines and sizes.
    pub fn amqp(&self) -> verge_amqp::Config {
        let open = std::time::Duration::from_secs(self.connect_timeout_secs);
        verge_amqp::Config {
            open_timeout: open,
            // A client puts its first token right after OPEN.
            auth_timeout: open.max(std::time::Duration::from_secs(10)),
            ..verge_amqp::Config::default()
        }
    }

    /// The HTTPS listener's deadlines.
    pub fn http_timeouts(&self) -> verge_listen::http::Timeouts {
        let t = std::time::Duration::from_secs(self.http_timeout_secs.max(1));
        verge_listen::http::Timeouts {
            header: t,
            body: t,
            write: t * 2,
            ..Default::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout_secs: default_connect_timeout(),
            max_inflight: default_inflight(),
            max_packet_bytes: default_max_packet(),
            twins_poll_ms: default_twins_poll(),
            routes_poll_ms: default_twins_poll(),
            max_mqtt_connections: None,
            max_https_connections: None,
            max_connections_per_ip: None,
            http_timeout_secs: default_http_timeout(),
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
fn default_http_timeout() -> u64 {
    30
}
fn default_inflight() -> usize {
    128
}
fn default_max_packet() -> usize {
    verge_core::message::MAX_MESSAGE_SIZE + 8 * 1024
}
fn default_twins_poll() -> u64 {
    1000
}
fn default_idle_timeout() -> u64 {
    3600
}
fn default_upstream_amqp_port() -> u16 {
    verge_dial::protocol::AMQP_PORT
}
fn default_upstream_port() -> u16 {
    8883
}
fn default_reconnect_ms() -> u64 {
    5000
}
fn default_batch_size() -> usize {
    // One read, one publish burst and one checkpoint per batch: 100 drains a
    // backlog 2–3× faster than 10 (BENCHMARKS.md) while a batch stays small
    // (at most 100 × 256 KB in the worst case, typically tens of KB).
    100
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
    #[expect(
        clippy::disallowed_methods,
        reason = "read once at start-up, before any listener or task exists"
    )]
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

    /// Fills what the file leaves out from the module environment `edge`
    /// (see the module docs) and checks that every identity and TLS source
    /// is known. `None`, or a file that gives everything: config-file mode.
    pub fn with_edge_env(mut self, edge: Option<crate::identity::EdgeEnv>) -> Result<Self, String> {
        let wants_edge = self.tls.is_none()
            || self.device_key.is_empty()
            || self.device_id.is_empty()
            || self.iothub_hostname.is_empty();
        if let Some(env) = edge.filter(|_| wants_edge) {
            if self.device_id.is_empty() {
                self.device_id = env.device_id.clone();
            } else if self.device_id != env.device_id {
                return Err(format!(
                    "device_id {:?} differs from IOTEDGE_DEVICEID {:?}",
                    self.device_id, env.device_id
                ));
            }
            if self.iothub_hostname.is_empty() {
                self.iothub_hostname = env.iothub_hostname.clone();
            }
            self.edge = Some(env);
        }
        self.check_sources()?;
        Ok(self)
    }

    /// Every identity and TLS source is known (config file or environment).
    pub fn check_sources(&self) -> Result<(), String> {
        let no_env = "and the module environment (IOTEDGE_WORKLOADURI, …) is not set";
        if self.device_id.is_empty() {
            return Err(format!("device_id is missing {no_env}"));
        }
        if self.iothub_hostname.is_empty() {
            return Err(format!("iothub_hostname is missing {no_env}"));
        }
        if self.edge.is_none() {
            if self.tls.is_none() {
                return Err(format!("[tls] cert and key are missing {no_env}"));
            }
            if self.device_key.is_empty() {
                return Err(format!("device_key is missing {no_env}"));
            }
        }
        self.validate()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.device_id.is_empty() {
            verge_core::DeviceId::new(self.device_id.as_str())
                .map_err(|e| format!("device_id: {e}"))?;
        }
        if !self.device_key.is_empty() {
            verge_core::SharedAccessKey::from_base64(&self.device_key)
                .map_err(|e| format!("device_key: {}", e.reason))?;
        }
        if self.workload.identities_refresh_secs == 0 || self.workload.cert_retry_max_secs == 0 {
            return Err(
                "workload.identities_refresh_secs and workload.cert_retry_max_secs must be at least 1"
                    .into(),
            );
        }
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
            if up.scope_refresh_secs == 0 {
                return Err("upstream.scope_refresh_secs must be at least 1".into());
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
        assert_eq!((up.port, up.reconnect_ms, up.batch_size), (8883, 5000, 100));
        let e = Config::from_toml(&format!("{text}bogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml(&format!("{text}reconnect_ms = 6000\n")).unwrap_err();
        assert!(e.contains("reconnect_ms"), "{e}");
        let e = Config::from_toml(&format!("{text}batch_size = 0\n")).unwrap_err();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn edge_environment_fills_what_the_file_leaves_out() {
        let env = crate::identity::EdgeEnv {
            workload_socket: PathBuf::from("/h/mnt/edgeHub.sock"),
            module_id: "$edgeHub".into(),
            generation_id: "1".into(),
            device_id: "edge1".into(),
            iothub_hostname: "hub.example".into(),
            gateway_hostname: "edge1.local".into(),
        };
        let minimal = "storage_dir = \"/tmp/x\"\n";
        let c = Config::from_toml(minimal).unwrap();
        assert_eq!(c.workload.identities_refresh_secs, 300);
        let e = c.clone().with_edge_env(None).unwrap_err();
        assert!(e.contains("device_id"), "{e}");
        let c = c.with_edge_env(Some(env.clone())).unwrap();
        assert_eq!(
            (c.device_id.as_str(), c.iothub_hostname.as_str()),
            ("edge1", "hub.example")
        );
        assert_eq!(c.edge.as_ref(), Some(&env));
        // A file that gives everything stays in config-file mode.
        let full = Config::from_toml(BASE)
            .unwrap()
            .with_edge_env(Some(env.clone()))
            .unwrap();
        assert!(full.edge.is_none());
        // …and without the environment a file must give everything.
        let no_tls = BASE.replace("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n", "");
        let e = Config::from_toml(&no_tls)
            .unwrap()
            .with_edge_env(None)
            .unwrap_err();
        assert!(e.contains("[tls]"), "{e}");
        let other = format!("device_id = \"edge9\"\n{minimal}");
        let e = Config::from_toml(&other)
            .unwrap()
            .with_edge_env(Some(env))
            .unwrap_err();
        assert!(e.contains("IOTEDGE_DEVICEID"), "{e}");
        let text = format!("{BASE}[upstream]\nhostname = \"cloud\"\nca_file = \"ca.pem\"\n");
        let up = Config::from_toml(&text).unwrap().upstream.unwrap();
        assert_eq!((up.https_port, up.scope_refresh_secs), (443, 3600));
    }

    #[test]
    fn bad_key_is_refused() {
        let e = Config::from_toml(&BASE.replace("AAAAAAAAAAAAAAAAAAAAAA==", "!!")).unwrap_err();
        assert!(e.contains("device_key"), "{e}");
    }
}
