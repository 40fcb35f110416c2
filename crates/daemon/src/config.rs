//! verged's configuration file: one TOML file shaped like aziot's `config.toml`.
//!
//! ```toml
//! hostname = "edge1.local"
//! homedir = "/var/lib/verge/edged"
//! # log_level = "info"   (fatal, error, warning, info, debug, verbose; RUST_LOG
//! #                       or RuntimeLogLevel in verged's environment win)
//! # parent_hostname = "parent.local"
//! # trust_bundle_cert = "/etc/verge/trust-bundle.pem"
//!
//! [provisioning]
//! source = "manual"
//! connection_string = "HostName=hub.azure-devices.net;DeviceId=edge1;SharedAccessKey=…"
//! # https_port = 443   (the hub's HTTPS port, where verged registers module
//! #                     identities; a self-hosted verge-cloud may use another)
//! # or: iothub_hostname = "…", device_id = "…",
//! # [provisioning.authentication] method = "sas", device_id_pk = { value = "<base64>" }
//! #   or method = "x509", identity_cert = "file:///…/edge1.pem",
//! #   identity_pk = "file:///…/edge1.key.pem"   (verged registers module
//! #   identities with the certificate; modules keep SAS, as in aziot)
//! # or, through a Device Provisioning Service (verge-cloud's or Azure's):
//! # source = "dps", global_endpoint = "https://global.azure-devices-provisioning.net/",
//! # id_scope = "0ne…", https_port = 443,
//! # [provisioning.attestation] method = "symmetric_key", registration_id = "edge1",
//! #   symmetric_key = { value = "<base64>" }   (for a group enrollment: the derived key)
//! #   or method = "x509", identity_cert = "file:///…", identity_pk = "file:///…"
//! #   (registration_id defaults to the certificate's CN)
//! # verged registers at its first start and keeps the assignment in
//! # <homedir>/dps/assignment.json (see crate::dps).
//!
//! [agent]
//! name = "edgeAgent"
//! type = "process"            # or "docker"
//! [agent.config]
//! image = "/usr/local/bin/verge-agent --flag"
//! [agent.env]
//! RuntimeLogLevel = "info"
//!
//! # [edge_ca] cert = "…", pk = "…"        (absent: auto-generated, for testing only)
//! # auto_generated_edge_ca_expiry_days = 90
//! # server_cert_lifetime_secs = 120   (testing only: shortens the server certificates
//! #                                    the workload API issues; default 30 days)
//! # [moby_runtime] uri = "unix:///var/run/docker.sock", network = "azure-iot-edge"
//! # [system_modules] edge_hub = "…", edge_agent = "…"   (what runs for Microsoft's
//! #                  azureiotedge-hub / -agent images; see `system_images`)
//! # [connect] workload_uri = "unix:///var/run/iotedge/workload.sock", management_uri = "…"
//! # [listen]  workload_uri = "unix://<homedir>/mnt", management_uri = "unix://<homedir>/mgmt.sock"
//! ```
//!
//! `[listen] workload_uri` names the **directory** holding the per-module workload
//! sockets (`<dir>/<module>.sock`); `[connect] workload_uri` is the path a
//! container sees its own socket under (bind mount). Unknown keys and invalid
//! values are errors that name the key and the line; nothing starts.
//! Relative paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use verge_core::connstr::ConnectionString;
use verge_core::id::{DeviceId, HubHostname};
use verge_core::sas::SharedAccessKey;

mod provisioning;
use provisioning::{parse_dps, parse_provisioning};

/// Default `homedir`.
pub const DEFAULT_HOMEDIR: &str = "/var/lib/verge/edged";
/// Default container-side workload socket URI.
pub const DEFAULT_CONNECT_WORKLOAD_URI: &str = "unix:///var/run/iotedge/workload.sock";
/// Default docker network.
pub const DEFAULT_NETWORK: &str = "azure-iot-edge";
/// Default docker URI.
pub const DEFAULT_MOBY_URI: &str = "unix:///var/run/docker.sock";
/// Default HTTPS port of the hub (module identity registration).
pub const DEFAULT_HTTPS_PORT: u16 = 443;
/// Default lifetime of an auto-generated edge CA.
pub const DEFAULT_CA_EXPIRY_DAYS: u32 = 90;

/// A configuration error: the file, the line (when known), the key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// Dotted key path (`provisioning.source`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source_path: PathBuf,
    /// This device's hostname (what modules and leaf devices dial).
    pub hostname: String,
    /// Parent edge hostname (nested edge).
    pub parent_hostname: Option<String>,
    /// Extra trusted CA certificates (PEM file), appended to the trust bundle.
    pub trust_bundle_cert: Option<PathBuf>,
    /// Storage directory (keys, identities, CA, sockets).
    pub homedir: PathBuf,
    /// The device's cloud identity (for DPS: the cached assignment).
    pub provisioning: ProvisioningConfig,
    /// `source = "dps"`: where and as whom verged registers.
    pub dps: Option<DpsSettings>,
    /// The agent verged starts and watches.
    pub agent: AgentConfig,
    /// Where the edge CA comes from.
    pub edge_ca: EdgeCaConfig,
    /// Docker, when configured.
    pub moby_runtime: Option<MobyRuntimeConfig>,
    /// What runs for Microsoft's system-module images.
    pub system_images: crate::system_images::SystemImages,
    /// URIs handed to modules.
    pub connect: ConnectConfig,
    /// Where verged listens.
    pub listen: ListenConfig,
    /// verged's log level (`RuntimeLogLevel` names), when `RUST_LOG` and
    /// `RuntimeLogLevel` are unset; `verge system set-log-level` writes it.
    pub log_level: Option<String>,
    /// Lifetime of issued server certificates, when shorter than the default
    /// ([`crate::ca::SERVER_CERT_DAYS`]): a test knob (renewal tests), `None`
    /// in production.
    pub server_cert_lifetime_secs: Option<u64>,
}

/// Manual provisioning result: hub, device and how the device authenticates.
#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    /// IoT hub hostname.
    pub iothub_hostname: HubHostname,
    /// Device id.
    pub device_id: DeviceId,
    /// The device's credential in the cloud.
    pub credential: DeviceCredential,
    /// The hub's HTTPS port (`[provisioning] https_port`, default 443): verged
    /// registers module identities there (see [`crate::cloud_identities`]).
    pub https_port: u16,
}

/// How the edge device authenticates to its hub.
#[derive(Debug, Clone)]
pub enum DeviceCredential {
    /// A symmetric key (SAS): module keys are derived from it too.
    SharedKey(SharedAccessKey),
    /// A client certificate (`identity_cert`, PEM, leaf first, and its
    /// key `identity_pk`). Modules keep SAS, as in aziot: their keys derive
    /// from a key verged generates and keeps (`keys/device.key`).
    X509 {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
}

impl ProvisioningConfig {
    /// The device's symmetric key, when it has one.
    pub fn device_key(&self) -> Option<&SharedAccessKey> {
        match &self.credential {
            DeviceCredential::SharedKey(k) => Some(k),
            DeviceCredential::X509 { .. } => None,
        }
    }
}

/// `[provisioning] source = "dps"` with symmetric-key or X.509 attestation.
#[derive(Debug, Clone)]
pub struct DpsSettings {
    /// `https://host[:port]`, no trailing slash.
    pub global_endpoint: String,
    /// The ID scope.
    pub id_scope: String,
    /// The registration id.
    pub registration_id: String,
    /// The attestation: the key the device signs with (for a group
    /// enrollment, the derived key), or its certificate. The device keeps it
    /// as its credential at the assigned hub.
    pub attestation: DeviceCredential,
}

/// What [`Config::dps_boot`] returns: enough to provision before the rest of
/// the configuration can be resolved.
#[derive(Debug, Clone)]
pub struct DpsBoot {
    /// The DPS settings.
    pub settings: DpsSettings,
    /// `homedir`, where the assignment is cached.
    pub homedir: PathBuf,
    /// `trust_bundle_cert`, trusted (with the system roots) for the DPS's TLS.
    pub trust_bundle_cert: Option<PathBuf>,
}

/// The message of the error [`Config::load`] gives for a DPS device that
/// has not registered yet.
pub const NOT_PROVISIONED: &str =
    "not provisioned through DPS yet: verged registers when it starts";

/// How the agent is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// A local process.
    Process,
    /// A docker container.
    Docker,
}

/// `[agent]`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Module name (`edgeAgent`).
    pub name: String,
    /// Process or docker.
    pub kind: AgentKind,
    /// Executable and arguments (process) or image (docker).
    pub image: String,
    /// Docker create options (`{}` when none).
    pub create_options: serde_json::Value,
    /// `[agent.env]`.
    pub env: BTreeMap<String, String>,
}

/// `[edge_ca]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeCaConfig {
    /// Operator-provided CA.
    Files {
        /// CA certificate (PEM).
        cert: PathBuf,
        /// CA private key (PEM).
        pk: PathBuf,
    },
    /// Generated by verged (testing only).
    AutoGenerated {
        /// Lifetime in days.
        expiry_days: u32,
    },
}

/// `[moby_runtime]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MobyRuntimeConfig {
    /// Docker URI (`unix:///var/run/docker.sock`).
    pub uri: String,
    /// Docker network for modules.
    pub network: String,
}

/// `[connect]`: what modules are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Workload URI as seen inside a container.
    pub workload_uri: String,
    /// Management URI given to the agent.
    pub management_uri: String,
}

/// `[listen]`: where verged binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// Directory of the per-module workload sockets.
    pub workload_dir: PathBuf,
    /// Management socket path.
    pub management_socket: PathBuf,
}

impl ListenConfig {
    /// The workload socket of `module_name` (runtime name, without `$`).
    pub fn workload_socket(&self, module_name: &str) -> PathBuf {
        self.workload_dir.join(format!("{module_name}.sock"))
    }
}

// ---- raw (as written) -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Spanned<String>,
    parent_hostname: Option<String>,
    trust_bundle_cert: Option<PathBuf>,
    homedir: Option<PathBuf>,
    provisioning: Spanned<RawProvisioning>,
    agent: Spanned<RawAgent>,
    edge_ca: Option<Spanned<RawEdgeCa>>,
    moby_runtime: Option<RawMoby>,
    system_modules: Option<RawSystemModules>,
    connect: Option<RawEndpoints>,
    listen: Option<RawEndpoints>,
    server_cert_lifetime_secs: Option<Spanned<i64>>,
    log_level: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystemModules {
    edge_hub: Option<String>,
    edge_agent: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    source: Spanned<String>,
    connection_string: Option<Spanned<String>>,
    iothub_hostname: Option<Spanned<String>>,
    device_id: Option<Spanned<String>>,
    authentication: Option<Spanned<RawAuthentication>>,
    https_port: Option<Spanned<i64>>,
    global_endpoint: Option<Spanned<String>>,
    id_scope: Option<Spanned<String>>,
    attestation: Option<Spanned<RawAttestation>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    method: Spanned<String>,
    registration_id: Option<Spanned<String>>,
    symmetric_key: Option<Spanned<RawKeyRef>>,
    // x509: a `file://` URI or a path
    identity_cert: Option<Spanned<toml::Value>>,
    identity_pk: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthentication {
    method: Spanned<String>,
    device_id_pk: Option<Spanned<RawKeyRef>>,
    // x509: a `file://` URI or a path (aziot's other forms are refused)
    identity_cert: Option<Spanned<toml::Value>>,
    identity_pk: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyRef {
    value: Option<Spanned<String>>,
    uri: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    config: Spanned<RawAgentConfig>,
    env: Option<BTreeMap<String, Spanned<toml::Value>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentConfig {
    image: Spanned<String>,
    #[serde(rename = "createOptions")]
    create_options: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdgeCa {
    cert: Option<PathBuf>,
    pk: Option<PathBuf>,
    method: Option<Spanned<String>>,
    auto_generated_edge_ca_expiry_days: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMoby {
    uri: Option<String>,
    network: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    workload_uri: Option<Spanned<String>>,
    management_uri: Option<Spanned<String>>,
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line(&s)),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path
                .parent()
                .map_or_else(|| p.to_path_buf(), |dir| dir.join(p))
        }
    }
}

/// The dotted key whose value starts at byte `offset`: the `key =` on that
/// line, under the last `[table]` header before it (`provisioning.https_port`).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let line = line.split('\n').next().unwrap_or_default();
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        });
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

/// serde's Rust type names in a message, in words a config author knows.
fn plain_type_names(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, plain) in [
        ("expected i64", "expected a number (without quotes)"),
        ("expected u16", "expected a number (without quotes)"),
        ("expected u32", "expected a number (without quotes)"),
        (
            "expected a boolean",
            "expected true or false (without quotes)",
        ),
    ] {
        m = m.replace(rust, plain);
    }
    m
}

fn unix_path(ctx: &Ctx<'_>, key: &str, v: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    match v.get_ref().strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(ctx.err(
            Some(v.span()),
            key,
            format!(
                "{:?} is not a unix:///absolute/path URI (only unix sockets are supported)",
                v.get_ref()
            ),
        )),
    }
}

/// The file's TOML into the raw shape, errors naming the key and line.
fn raw_config(ctx: &Ctx<'_>) -> Result<RawConfig, ConfigError> {
    let (text, path) = (ctx.text, ctx.path);
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_owned();
        // serde names unknown/missing keys in the message itself, but
        // not the key of a value of the wrong type: find it from the span.
        let key = e
            .span()
            .filter(|_| message.starts_with("invalid type") || message.starts_with("invalid value"))
            .and_then(|s| key_at(text, s.start));
        let message = match &key {
            Some(_) => plain_type_names(&message),
            None => message,
        };
        ConfigError {
            path: path.to_path_buf(),
            line: e.span().map(|s| ctx.line(&s)),
            key,
            message,
        }
    })
}

impl Config {
    /// For `source = "dps"`: the settings verged needs to register before
    /// [`Config::load`] can resolve the identity; `None` for other sources.
    pub fn dps_boot(path: &Path) -> Result<Option<DpsBoot>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let ctx = Ctx { path, text: &text };
        let raw = raw_config(&ctx)?;
        if raw.provisioning.get_ref().source.get_ref() != "dps" {
            return Ok(None);
        }
        Ok(Some(DpsBoot {
            settings: parse_dps(&ctx, &raw.provisioning)?,
            homedir: ctx.resolve(
                raw.homedir
                    .as_deref()
                    .unwrap_or_else(|| Path::new(DEFAULT_HOMEDIR)),
            ),
            trust_bundle_cert: raw.trust_bundle_cert.map(|p| ctx.resolve(&p)),
        }))
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let config = Self::parse(&text, path)?;
        config.check_files()?;
        Ok(config)
    }

    /// The files the config names must exist (a typo would otherwise show
    /// only later, as a TLS or CA error far from its cause).
    fn check_files(&self) -> Result<(), ConfigError> {
        let mut files: Vec<(&str, &Path)> = Vec::new();
        if let Some(p) = &self.trust_bundle_cert {
            files.push(("trust_bundle_cert", p));
        }
        if let EdgeCaConfig::Files { cert, pk } = &self.edge_ca {
            files.push(("edge_ca.cert", cert));
            files.push(("edge_ca.pk", pk));
        }
        if let DeviceCredential::X509 { cert, key } = &self.provisioning.credential {
            let (c, k) = if self.dps.is_some() {
                (
                    "provisioning.attestation.identity_cert",
                    "provisioning.attestation.identity_pk",
                )
            } else {
                (
                    "provisioning.authentication.identity_cert",
                    "provisioning.authentication.identity_pk",
                )
            };
            files.push((c, cert));
            files.push((k, key));
        }
        for (key, file) in files {
            if let Err(e) = std::fs::metadata(file) {
                return Err(ConfigError {
                    path: self.source_path.clone(),
                    line: None,
                    key: Some(key.to_owned()),
                    message: format!("cannot read {}: {e}", file.display()),
                });
            }
        }
        Ok(())
    }

    /// Validates config text (`path` is used for messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = Ctx { path, text };
        let raw = raw_config(&ctx)?;

        let hostname = raw.hostname.get_ref().trim().to_owned();
        if hostname.is_empty() {
            return Err(ctx.err(Some(raw.hostname.span()), "hostname", "must not be empty"));
        }
        let homedir = ctx.resolve(
            raw.homedir
                .as_deref()
                .unwrap_or_else(|| Path::new(DEFAULT_HOMEDIR)),
        );

        let (provisioning, dps) = parse_provisioning(&ctx, &raw.provisioning, &homedir)?;
        let agent = parse_agent(&ctx, &raw.agent)?;
        let edge_ca = parse_edge_ca(&ctx, raw.edge_ca.as_ref())?;

        let moby_runtime = raw.moby_runtime.map(|m| MobyRuntimeConfig {
            uri: m.uri.unwrap_or_else(|| DEFAULT_MOBY_URI.to_owned()),
            network: m.network.unwrap_or_else(|| DEFAULT_NETWORK.to_owned()),
        });

        let listen_raw = raw.listen.as_ref();
        let workload_dir = match listen_raw.and_then(|l| l.workload_uri.as_ref()) {
            Some(v) => unix_path(&ctx, "listen.workload_uri", v)?,
            None => homedir.join("mnt"),
        };
        let management_socket = match listen_raw.and_then(|l| l.management_uri.as_ref()) {
            Some(v) => unix_path(&ctx, "listen.management_uri", v)?,
            None => homedir.join("mgmt.sock"),
        };
        let connect_raw = raw.connect.as_ref();
        let workload_uri = match connect_raw.and_then(|c| c.workload_uri.as_ref()) {
            Some(v) => {
                unix_path(&ctx, "connect.workload_uri", v)?;
                v.get_ref().clone()
            }
            None => DEFAULT_CONNECT_WORKLOAD_URI.to_owned(),
        };
        let management_uri = match connect_raw.and_then(|c| c.management_uri.as_ref()) {
            Some(v) => {
                unix_path(&ctx, "connect.management_uri", v)?;
                v.get_ref().clone()
            }
            None => format!("unix://{}", management_socket.display()),
        };

        // Test knob: at least 10 s (renewal needs time to happen), and
        // never longer than the default.
        let server_cert_lifetime_secs = match &raw.server_cert_lifetime_secs {
            Some(v) => {
                let max = crate::ca::SERVER_CERT_DAYS * 86_400;
                let secs = *v.get_ref();
                if !(10..=max).contains(&secs) {
                    return Err(ctx.err(
                        Some(v.span()),
                        "server_cert_lifetime_secs",
                        format!("must be between 10 and {max} (30 days)"),
                    ));
                }
                u64::try_from(secs).ok()
            }
            None => None,
        };

        let log_level = match &raw.log_level {
            Some(v) => {
                verge_log::runtime_log_level(v.get_ref())
                    .map_err(|e| ctx.err(Some(v.span()), "log_level", e))?;
                Some(v.get_ref().trim().to_ascii_lowercase())
            }
            None => None,
        };

        Ok(Config {
            log_level,
            source_path: path.to_path_buf(),
            hostname,
            parent_hostname: raw.parent_hostname.filter(|p| !p.trim().is_empty()),
            trust_bundle_cert: raw.trust_bundle_cert.map(|p| ctx.resolve(&p)),
            homedir,
            provisioning,
            dps,
            agent,
            edge_ca,
            moby_runtime,
            system_images: crate::system_images::SystemImages {
                edge_hub: raw.system_modules.as_ref().and_then(|s| s.edge_hub.clone()),
                edge_agent: raw
                    .system_modules
                    .as_ref()
                    .and_then(|s| s.edge_agent.clone()),
                own_exe: None,
            }
            .with_current_exe(),
            connect: ConnectConfig {
                workload_uri,
                management_uri,
            },
            listen: ListenConfig {
                workload_dir,
                management_socket,
            },
            server_cert_lifetime_secs,
        })
    }
}

fn parse_agent(ctx: &Ctx<'_>, raw: &Spanned<RawAgent>) -> Result<AgentConfig, ConfigError> {
    let a = raw.get_ref();
    let name = a.name.get_ref().trim().to_owned();
    verge_core::id::ModuleId::new(name.as_str())
        .map_err(|e| ctx.err(Some(a.name.span()), "agent.name", e.to_string()))?;
    let kind = match a.kind.get_ref().as_str() {
        "process" => AgentKind::Process,
        "docker" => AgentKind::Docker,
        other => {
            return Err(ctx.err(
                Some(a.kind.span()),
                "agent.type",
                format!("unknown agent type {other:?}; expected \"process\" or \"docker\""),
            ));
        }
    };
    let cfg = a.config.get_ref();
    let image = cfg.image.get_ref().trim().to_owned();
    if image.is_empty() {
        return Err(ctx.err(
            Some(cfg.image.span()),
            "agent.config.image",
            "must not be empty",
        ));
    }
    let create_options = match &cfg.create_options {
        Some(v) => serde_json::to_value(v).map_err(|e| {
            ctx.err(
                Some(a.config.span()),
                "agent.config.createOptions",
                e.to_string(),
            )
        })?,
        None => serde_json::json!({}),
    };
    let mut env = BTreeMap::new();
    for (k, v) in a.env.iter().flatten() {
        let value = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ctx.err(
                    Some(v.span()),
                    &format!("agent.env.{k}"),
                    "environment values must be strings, numbers or booleans",
                ));
            }
        };
        env.insert(k.clone(), value);
    }
    Ok(AgentConfig {
        name,
        kind,
        image,
        create_options,
        env,
    })
}

fn parse_edge_ca(
    ctx: &Ctx<'_>,
    raw: Option<&Spanned<RawEdgeCa>>,
) -> Result<EdgeCaConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(EdgeCaConfig::AutoGenerated {
            expiry_days: DEFAULT_CA_EXPIRY_DAYS,
        });
    };
    let c = raw.get_ref();
    if let Some(m) = &c.method {
        return Err(ctx.err(
            Some(m.span()),
            "edge_ca.method",
            format!(
                "edge CA method {:?} is not supported yet; give cert + pk, or leave [edge_ca] out for an auto-generated CA",
                m.get_ref()
            ),
        ));
    }
    match (&c.cert, &c.pk) {
        (Some(cert), Some(pk)) => {
            if c.auto_generated_edge_ca_expiry_days.is_some() {
                return Err(ctx.err(
                    Some(raw.span()),
                    "edge_ca.auto_generated_edge_ca_expiry_days",
                    "only applies to an auto-generated CA, not with cert + pk",
                ));
            }
            Ok(EdgeCaConfig::Files {
                cert: ctx.resolve(cert),
                pk: ctx.resolve(pk),
            })
        }
        (None, None) => {
            let expiry_days = match &c.auto_generated_edge_ca_expiry_days {
                None => DEFAULT_CA_EXPIRY_DAYS,
                Some(d) => match u32::try_from(*d.get_ref()) {
                    Ok(v) if (1..=36_500).contains(&v) => v,
                    _ => {
                        return Err(ctx.err(
                            Some(d.span()),
                            "edge_ca.auto_generated_edge_ca_expiry_days",
                            "must be between 1 and 36500 days",
                        ));
                    }
                },
            };
            Ok(EdgeCaConfig::AutoGenerated { expiry_days })
        }
        _ => Err(ctx.err(
            Some(raw.span()),
            if c.cert.is_none() {
                "edge_ca.cert"
            } else {
                "edge_ca.pk"
            },
            "cert and pk must be given together",
        )),
    }
}

#[cfg(test)]
mod tests;
