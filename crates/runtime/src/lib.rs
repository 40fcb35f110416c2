//! How verged runs modules: one [`ModuleRuntime`] trait, two backends.
//!
//! The daemon's management API and the edge agent only ever see this trait, so
//! a device with Docker and one without run the same deployment logic.

pub mod docker;
pub mod images;
pub mod process;
pub mod pull;

pub use docker::{DockerConfig, DockerRuntime};
pub use process::{ProcessConfig, ProcessRuntime};
pub use pull::PullStatus;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use verge_core::time::Timestamp;

/// What to run. Everything the runtime needs to (re)create a module, and
/// everything the agent compares to decide whether a module must be updated:
/// backends keep the spec with the module (Docker: labels; process: state dir)
/// and return it from [`ModuleRuntime::get`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSpec {
    /// Module name (`edgeHub`, `filter`, …); unique on the device.
    pub name: String,
    /// Docker: the image reference. Process backend: the executable path,
    /// followed by arguments separated by whitespace.
    pub image: String,
    /// Docker create-container options as given in the manifest (`{}` when none).
    /// The process backend reads only `Cmd` (extra args) and `WorkingDir` and
    /// ignores the rest.
    pub create_options: serde_json::Value,
    /// Environment, including the `IOTEDGE_*` variables verged injects.
    pub env: BTreeMap<String, String>,
    /// Free-form labels the agent stores with the module (e.g. the manifest
    /// `version`); returned unchanged by `get`/`list`.
    pub labels: BTreeMap<String, String>,
    /// Host path of this module's own workload socket; bind-mounted (Docker)
    /// or passed through the environment (process).
    pub workload_socket: Option<PathBuf>,
    /// Host path of the management socket; only the agent gets one.
    pub management_socket: Option<PathBuf>,
}

/// Credentials for pulling from a private registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// Registry address (`myacr.azurecr.io`, `127.0.0.1:5000`).
    pub address: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// Runtime status, mapped as edgelet maps Docker states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleStatus {
    /// Running.
    Running,
    /// Created, paused, or exited with code 0.
    Stopped,
    /// Exited with a non-zero code.
    Failed,
    /// Dead (Docker).
    Dead,
    /// Anything else.
    Unknown,
}

/// Health as reported by a Docker healthcheck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The healthcheck has not settled yet.
    Starting,
    /// Passing.
    Healthy,
    /// Failing.
    Unhealthy,
}

/// What the runtime knows about one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleState {
    /// The spec it was created with.
    pub spec: ModuleSpec,
    /// Current status.
    pub status: ModuleStatus,
    /// Exit code of the last run, if it exited.
    pub exit_code: Option<i64>,
    /// When it last started.
    pub started_at: Option<Timestamp>,
    /// When it last exited.
    pub exited_at: Option<Timestamp>,
    /// Healthcheck result, when the module has one.
    pub health: Option<Health>,
    /// Backend-specific id (container id, process id).
    pub runtime_id: Option<String>,
    /// Image digest (`sha256:…`) the module runs, when known.
    pub image_id: Option<String>,
}

/// Which log lines to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming new lines.
    pub follow: bool,
    /// Only the last N lines (None = all).
    pub tail: Option<usize>,
    /// Only lines at or after this time.
    pub since: Option<Timestamp>,
    /// Only lines before this time.
    pub until: Option<Timestamp>,
    /// Prefix each line with its timestamp.
    pub timestamps: bool,
}

/// A stream of log chunks (whole lines, `\n`-terminated).
pub type LogStream = Pin<Box<dyn futures_core::Stream<Item = Result<Bytes, RuntimeError>> + Send>>;

/// Facts about the backend, for `systeminfo` and `verge check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// "docker" or "process".
    pub kind: String,
    /// Backend version (Docker Engine version; the verge version for process).
    pub version: String,
    /// OS type ("linux").
    pub os_type: String,
    /// CPU architecture ("x86_64").
    pub architecture: String,
}

/// Why a runtime call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No module of that name.
    #[error("module {0} not found")]
    NotFound(String),
    /// A module of that name exists already.
    #[error("module {0} already exists")]
    AlreadyExists(String),
    /// The image is not present locally and was not (or could not be) pulled.
    #[error("image {0} not found")]
    ImageNotFound(String),
    /// Pulling failed.
    #[error("pulling image {image} failed: {reason}")]
    PullFailed {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// The spec cannot be run (bad createOptions, missing executable, …).
    #[error("invalid module spec for {module}: {reason}")]
    InvalidSpec {
        /// The module.
        module: String,
        /// Why.
        reason: String,
    },
    /// The backend cannot be reached (Docker socket missing, …); retry later.
    #[error("container runtime unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend reported.
    #[error("runtime error: {0}")]
    Other(String),
}

/// A module runtime backend. Calls are independent and may run concurrently.
#[async_trait::async_trait]
pub trait ModuleRuntime: Send + Sync {
    /// Pulls an image (Docker); a no-op that checks the executable exists (process).
    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), RuntimeError>;
    /// [`pull`](Self::pull) on behalf of module `module`, so a runtime
    /// reached through verged can show whose pull it is (the default
    /// ignores the name).
    async fn pull_for(
        &self,
        module: &str,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        let _ = module;
        self.pull(image, auth).await
    }
    /// The pulls in flight and how far each has got (the default: none
    /// known, e.g. the process backend, which pulls nothing).
    async fn pulls(&self) -> Result<Vec<PullStatus>, RuntimeError> {
        Ok(Vec::new())
    }
    /// How far the pull of `image` for `module` has got, if one is in
    /// flight (the default looks `image` up in [`pulls`](Self::pulls)).
    async fn pull_status(
        &self,
        module: &str,
        image: &str,
    ) -> Result<Option<PullStatus>, RuntimeError> {
        let _ = module;
        Ok(self.pulls().await?.into_iter().find(|p| p.image == image))
    }
    /// Creates a module without starting it.
    async fn create(&self, spec: &ModuleSpec) -> Result<(), RuntimeError>;
    /// Starts a created or stopped module.
    async fn start(&self, name: &str) -> Result<(), RuntimeError>;
    /// Stops a module: SIGTERM, then SIGKILL after `timeout`.
    async fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError>;
    /// Stops (if running) and starts a module again.
    async fn restart(&self, name: &str) -> Result<(), RuntimeError>;
    /// Removes a module, stopping it first.
    async fn remove(&self, name: &str) -> Result<(), RuntimeError>;
    /// One module's state.
    async fn get(&self, name: &str) -> Result<ModuleState, RuntimeError>;
    /// Every module this runtime created for verged (not other containers).
    async fn list(&self) -> Result<Vec<ModuleState>, RuntimeError>;
    /// A module's logs.
    async fn logs(&self, name: &str, options: &LogOptions) -> Result<LogStream, RuntimeError>;
    /// Backend facts.
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError>;
    /// The content digests (`sha256:…`) of the local image `image`: its id
    /// and the registry digests it was pulled or pushed with, so a pinned
    /// digest can be checked before a module is created from it.
    /// [`RuntimeError::ImageNotFound`] when the image is not present;
    /// `Ok(None)` when the backend has no notion of image digests (the
    /// default, e.g. the process backend), in which case nothing is checked.
    async fn image_digests(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        let _ = image;
        Ok(None)
    }
}
