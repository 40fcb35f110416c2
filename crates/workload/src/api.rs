//! JSON bodies of the workload and management APIs (field names as aziot's).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Workload API version modules are told to use (`IOTEDGE_APIVERSION`).
pub const WORKLOAD_API_VERSION: &str = "2019-01-30";
/// Management API version given to the agent.
pub const MANAGEMENT_API_VERSION: &str = "2022-08-03";

/// `{"message": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Why.
    pub message: String,
}

// ---- workload ----------------------------------------------------------------

/// `POST …/sign`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignRequest {
    /// `primary` (ignored).
    #[serde(default)]
    pub key_id: Option<String>,
    /// `HMACSHA256` (the only one).
    #[serde(default)]
    pub algo: Option<String>,
    /// Base64 data to sign.
    pub data: String,
}

/// Sign response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignResponse {
    /// Base64 HMAC-SHA256.
    pub digest: String,
}

/// `POST …/encrypt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    /// Base64 plaintext.
    pub plaintext: String,
    /// Base64 IV (bound as associated data).
    pub initialization_vector: String,
}

/// Encrypt response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptResponse {
    /// Base64 ciphertext.
    pub ciphertext: String,
}

/// `POST …/decrypt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    /// Base64 ciphertext.
    pub ciphertext: String,
    /// Base64 IV.
    pub initialization_vector: String,
}

/// Decrypt response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecryptResponse {
    /// Base64 plaintext.
    pub plaintext: String,
}

/// `POST …/certificate/server`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerCertificateRequest {
    /// Hostname the certificate is for.
    pub common_name: String,
    /// Optional ISO-8601 notAfter.
    #[serde(default)]
    pub expiration: Option<String>,
}

/// `POST …/certificate/identity`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityCertificateRequest {
    /// Optional ISO-8601 notAfter.
    #[serde(default)]
    pub expiration: Option<String>,
}

/// Private key part of a certificate response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateKey {
    /// Always `key`.
    #[serde(rename = "type")]
    pub kind: String,
    /// PEM.
    pub bytes: String,
}

/// Certificate responses (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The new key.
    pub private_key: PrivateKey,
    /// Leaf then edge CA (PEM).
    pub certificate: String,
    /// ISO-8601 notAfter.
    pub expiration: String,
}

/// One entry of the Verge extension `GET /modules/$edgeHub/identities`
/// (edgeHub's workload socket only): a module identity with its SAS key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubModuleIdentity {
    /// Identity id (`$edgeHub`, `filter`).
    pub module_id: String,
    /// Current generation id.
    pub generation_id: String,
    /// The module's SAS key, base64 (derived from the device key).
    pub key: String,
}

impl std::fmt::Debug for HubModuleIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in logs.
        f.debug_struct("HubModuleIdentity")
            .field("module_id", &self.module_id)
            .field("generation_id", &self.generation_id)
            .finish_non_exhaustive()
    }
}

/// `GET /trust-bundle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundleResponse {
    /// PEM bundle.
    pub certificate: String,
}

// ---- management ----------------------------------------------------------------

/// `{key, value}` env entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Name.
    pub key: String,
    /// Value.
    pub value: String,
}

/// `config.settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSettings {
    /// Image (docker) or executable + args (process).
    pub image: String,
    /// Docker create options.
    #[serde(default = "empty_object")]
    pub create_options: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// Registry credentials (`config.auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuthJson {
    /// Registry.
    pub serveraddress: String,
    /// User.
    pub username: String,
    /// Password.
    pub password: String,
}

/// Module `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleConfig {
    /// Settings.
    pub settings: ModuleSettings,
    /// Environment (user entries; verged adds the `IOTEDGE_*` ones).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Registry credentials for the pull (never returned).
    #[serde(default, skip_serializing)]
    pub auth: Option<RegistryAuthJson>,
}

/// `POST /modules`, `PUT /modules/{name}` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSpecJson {
    /// Module name.
    pub name: String,
    /// `docker` (informational).
    #[serde(rename = "type", default = "docker")]
    pub kind: String,
    /// `on-create` (pull before create, the default) or `never`.
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// Config.
    pub config: ModuleConfig,
    /// Verge extension: labels stored with the module.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn docker() -> String {
    "docker".to_owned()
}

/// Exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitStatus {
    /// ISO-8601.
    pub exit_time: String,
    /// Exit code as text.
    pub status_code: String,
}

/// Runtime status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// `running`, `stopped`, `failed`, `dead`, `unknown`.
    pub status: String,
    /// Human text.
    #[serde(default)]
    pub description: Option<String>,
    /// Verge extension: the Docker healthcheck's verdict (`starting`,
    /// `healthy`, `unhealthy`), absent without one: the agent's
    /// `on-unhealthy` restarts act on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// Module status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatusJson {
    /// ISO-8601 start time.
    #[serde(default)]
    pub start_time: Option<String>,
    /// Last exit.
    #[serde(default)]
    pub exit_status: Option<ExitStatus>,
    /// Status.
    pub runtime_status: RuntimeStatus,
}

/// One module (`GET /modules/{name}`, list entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleDetails {
    /// Runtime id (container id / pid).
    pub id: String,
    /// Name.
    pub name: String,
    /// `docker` or `process`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Config (env as the module got it).
    pub config: ModuleConfig,
    /// Status.
    pub status: ModuleStatusJson,
    /// Verge extension: labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ModuleDetails {
    /// A module of `kind` running `image` in `status`, with nothing else
    /// known (no id, times, environment or createOptions): for rows made
    /// from something other than the runtime's answer.
    pub fn bare(name: &str, kind: &str, image: &str, status: &str) -> Self {
        Self {
            id: String::new(),
            name: name.to_owned(),
            kind: kind.to_owned(),
            config: ModuleConfig {
                settings: ModuleSettings {
                    image: image.to_owned(),
                    create_options: serde_json::json!({}),
                },
                env: Vec::new(),
                auth: None,
            },
            status: ModuleStatusJson {
                start_time: None,
                exit_status: None,
                runtime_status: RuntimeStatus {
                    status: status.to_owned(),
                    description: None,
                    health: None,
                },
            },
            labels: BTreeMap::new(),
        }
    }
}

/// `GET /modules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleList {
    /// Modules.
    pub modules: Vec<ModuleDetails>,
}

/// An identity as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityJson {
    /// Id.
    pub module_id: String,
    /// Manager.
    pub managed_by: String,
    /// Generation.
    pub generation_id: String,
    /// `Sas`.
    pub auth_type: String,
}

/// `GET /identities/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityList {
    /// Identities.
    pub identities: Vec<IdentityJson>,
}

/// `POST /identities/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateIdentityRequest {
    /// Id.
    pub module_id: String,
    /// Manager (default `iotedge`).
    #[serde(default)]
    pub managed_by: Option<String>,
}

/// `PUT /identities/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateIdentityRequest {
    /// New generation id (minted when absent).
    #[serde(default)]
    pub generation_id: Option<String>,
    /// New manager.
    #[serde(default)]
    pub managed_by: Option<String>,
}

/// `provisioning` in systeminfo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningInfo {
    /// `manual`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always false.
    pub dynamic_reprovisioning: bool,
    /// Always false.
    pub always_reprovision_on_startup: bool,
}

/// `GET /systeminfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    /// `linux`.
    pub os_type: String,
    /// CPU architecture.
    pub architecture: String,
    /// verged version.
    pub version: String,
    /// Provisioning.
    pub provisioning: ProvisioningInfo,
    /// Runtime backend version.
    pub server_version: String,
    /// Kernel release.
    pub kernel_version: String,
    /// OS name.
    pub operating_system: String,
    /// CPU count.
    pub cpus: u32,
    /// Total memory in bytes (0 when unknown).
    pub total_memory: u64,
    /// `unknown`.
    pub virtualized: String,
}

// ---- Verge extensions of the management API --------------------------------------

/// How the agent's last run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentExit {
    /// ISO-8601.
    pub time: String,
    /// Exit code; `null` when a signal ended it.
    pub code: Option<i64>,
    /// The signal that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// `GET /systeminfo/agent`: the agent verged supervises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// The agent's name from the config (`edgeAgent`).
    pub name: String,
    /// `process` (verged's child) or `docker` (a container).
    pub kind: String,
    /// Executable and arguments, or the image.
    pub image: String,
    /// Pid of the running process (process agents only).
    pub pid: Option<u32>,
    /// ISO-8601 start of the current (or last) run.
    pub start_time: Option<String>,
    /// How often verged restarted it (the first start does not count).
    pub restart_count: u64,
    /// How the last run ended.
    pub last_exit: Option<AgentExit>,
    /// `starting`, `running`, `backoff` (exited, restart pending),
    /// `failed` (could not be started, retry pending) or `stopped`.
    pub status: String,
}

/// The edge CA in `GET /certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeCaInfo {
    /// Subject common name.
    pub common_name: String,
    /// ISO-8601.
    pub not_before: String,
    /// ISO-8601.
    pub not_after: String,
    /// Generated by verged (testing only) rather than configured.
    pub auto_generated: bool,
}

/// One certificate the edge CA issued (the latest per module and kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertInfo {
    /// Module id of the requester (`$edgeHub`).
    pub module: String,
    /// `server` or `identity`.
    pub kind: String,
    /// Subject common name.
    pub common_name: String,
    /// ISO-8601.
    pub not_before: String,
    /// ISO-8601.
    pub not_after: String,
    /// ISO-8601.
    pub issued_at: String,
}

/// `GET /certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateList {
    /// The issuing CA.
    pub edge_ca: EdgeCaInfo,
    /// Issued certificates, sorted by module then kind.
    pub issued: Vec<IssuedCertInfo>,
}

/// A file system in `GET /systeminfo/resources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Device (from /proc/mounts), or the mount point when unknown.
    pub name: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Bytes available to unprivileged users.
    pub available_space: u64,
    /// Size in bytes.
    pub total_space: u64,
    /// File system type (`ext4`, `overlay`, …).
    pub file_system: String,
}

/// One module's (or the agent's) use of the host, its whole process tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleResources {
    /// Module name.
    pub name: String,
    /// Main pid.
    pub pid: u32,
    /// Processes in its tree.
    pub processes: u32,
    /// CPU use over the sample, percent of one CPU (can exceed 100).
    pub cpu_percent: f64,
    /// Resident memory in bytes.
    pub memory_bytes: u64,
}

/// `GET /systeminfo/resources` (aziot's field names, plus `modules` and `notes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemResources {
    /// Seconds since the host booted.
    pub host_uptime: u64,
    /// Seconds since verged started.
    pub process_uptime: u64,
    /// Host CPU use over the sample, percent of all CPUs (0 to 100).
    pub used_cpu: f64,
    /// Bytes of memory in use (total minus available).
    pub used_ram: u64,
    /// Bytes of memory.
    pub total_ram: u64,
    /// File systems of the root and of verged's homedir, and every mounted block device.
    pub disks: Vec<DiskInfo>,
    /// Docker's container stats; always `null` for now (see `notes`).
    pub docker_stats: Option<serde_json::Value>,
    /// Per-module use, where the runtime lets verged tell (process backend).
    pub modules: Vec<ModuleResources>,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

/// `GET /images/digests?image={reference}` (Verge extension): the content
/// digests of a local image, so the agent checks a pinned digest
/// (`settings.digest`, `name@sha256:…`) through verged as it does with
/// Docker directly. 404 when the image is not present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDigests {
    /// The reference asked about.
    pub image: String,
    /// The image id and its registry digests; `null` when the backend has
    /// no image digests (the process backend).
    pub digests: Option<Vec<String>>,
}

/// `GET /images/pulls` (Verge extension): the image pulls verged has in
/// flight, so the agent reports a module as `downloading` and `verge list`
/// shows it before its container exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePulls {
    /// One entry per image being pulled, by image.
    pub pulls: Vec<ImagePull>,
}

/// One pull in flight (see [`ImagePulls`]): `{"image", "layers",
/// "layersDone", "downloadedBytes", "totalBytes", "modules"}`, where
/// `image` is the image that will run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePull {
    /// How far it has got.
    #[serde(flatten)]
    pub progress: verge_core::pull::PullStatus,
    /// The modules whose create or `prepareupdate` asked for it.
    #[serde(default)]
    pub modules: Vec<String>,
}
