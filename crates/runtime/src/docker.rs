//! The Docker backend: modules are containers, driven through the Docker
//! Engine API (bollard).
//!
//! * The connection is made lazily on the first call and retried on the next
//!   call when it fails, so a daemon that starts before Docker gets
//!   [`RuntimeError::Unavailable`] instead of a dead runtime. The API version is
//!   negotiated down to what the engine speaks.
//! * `create` passes the module's createOptions to Docker as the
//!   create-container body, then sets the image, the environment (the spec's
//!   `env` over createOptions `Env`), the container name (= module name), the
//!   network (unless createOptions set `HostConfig.NetworkMode`), bind mounts of
//!   the workload and management sockets at the paths named by
//!   `IOTEDGE_WORKLOADURI` / `IOTEDGE_MANAGEMENTURI`, on the module network
//!   the network alias `EdgeDeviceHostName` for edgeHub (so modules reach it
//!   under their `IOTEDGE_GATEWAYHOSTNAME`, as in IoT Edge), and the labels
//!   [`OWNER_LABEL`] and [`SPEC_LABEL`] (plus the spec's own labels), by which
//!   `list`/`get` find the module and its spec again after a restart.
//! * Socket bind mounts need the host socket to exist at `create` time
//!   (otherwise Docker would create a directory in its place).
//! * Statuses are mapped as edgelet maps them (reference §2.2).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, CreateImageInfo,
    HealthStatusEnum, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, InspectNetworkOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions,
    RestartContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bytes::Bytes;
use futures_util::StreamExt;
use verge_core::time::Timestamp;

use crate::pull::{LayerProgress, Pulls};
use crate::{
    Health, LogOptions, LogStream, ModuleRuntime, ModuleSpec, ModuleState, ModuleStatus,
    PullStatus, RegistryAuth, RuntimeError, RuntimeInfo,
};

mod logs;
use logs::frame_lines;

/// Label carrying the owner of a container; `list` returns only containers
/// whose value equals [`DockerConfig::owner`].
pub const OWNER_LABEL: &str = "net.verge.owner";
/// Label carrying the module's [`ModuleSpec`] as JSON.
pub const SPEC_LABEL: &str = "net.verge.spec";
/// Default Docker socket.
pub const DEFAULT_DOCKER_URI: &str = "unix:///var/run/docker.sock";
/// Default module network (as IoT Edge's).
pub const DEFAULT_NETWORK: &str = "azure-iot-edge";
/// The hub's module name: its container gets the device's hostname as a
/// network alias.
const EDGE_HUB: &str = "edgeHub";
/// Container path of the workload socket when `IOTEDGE_WORKLOADURI` is unset.
pub const DEFAULT_WORKLOAD_PATH: &str = "/var/run/iotedge/workload.sock";
/// Container path of the management socket when `IOTEDGE_MANAGEMENTURI` is unset.
pub const DEFAULT_MANAGEMENT_PATH: &str = "/var/run/iotedge/mgmt.sock";

/// Settings of a [`DockerRuntime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// Engine URI: `unix:///path` or `http://host:port` (`tcp://` is read as http).
    pub uri: String,
    /// Network modules are attached to; created when missing.
    pub network: String,
    /// Value of [`OWNER_LABEL`] on our containers.
    pub owner: String,
    /// Stop timeout used by `restart` and `remove`, which take none.
    pub stop_timeout: Duration,
    /// Timeout for one Engine API request (until the response starts).
    pub request_timeout: Duration,
    /// Upper bound for a whole image pull.
    pub pull_timeout: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            uri: DEFAULT_DOCKER_URI.to_owned(),
            network: DEFAULT_NETWORK.to_owned(),
            owner: "verged".to_owned(),
            stop_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            pull_timeout: Duration::from_secs(600),
        }
    }
}

/// Runs modules as Docker containers. See the [module docs](self).
#[derive(Debug)]
pub struct DockerRuntime {
    config: DockerConfig,
    client: tokio::sync::Mutex<Option<Docker>>,
    network_ready: AtomicBool,
    pulls: Pulls,
}

/// Whether a bollard error means the engine could not be reached.
fn is_unreachable(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::IOError { .. }
            | BollardError::HyperLegacyError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
            | BollardError::APIVersionParseError {}
    )
}

pub(crate) fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Maps an error of a call about one container.
fn container_error(name: &str, e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return RuntimeError::Unavailable(e.to_string());
    }
    match status_of(&e) {
        Some(404) => RuntimeError::NotFound(name.to_owned()),
        Some(409) => RuntimeError::Other(format!("{name}: {}", message_of(&e))),
        _ => RuntimeError::Other(format!("{name}: {}", message_of(&e))),
    }
}

pub(crate) fn general_error(e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        RuntimeError::Unavailable(e.to_string())
    } else {
        RuntimeError::Other(message_of(&e))
    }
}

fn pull_error(image: &str, e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return RuntimeError::Unavailable(e.to_string());
    }
    let reason = message_of(&e);
    let lower = reason.to_ascii_lowercase();
    let not_found = status_of(&e) == Some(404)
        || lower.contains("manifest unknown")
        || lower.contains("not found")
        || lower.contains("does not exist");
    if not_found {
        RuntimeError::ImageNotFound(image.to_owned())
    } else {
        RuntimeError::PullFailed {
            image: image.to_owned(),
            reason,
        }
    }
}

/// `repo` → `repo:latest`; references with a tag or digest are kept.
fn with_default_tag(image: &str) -> String {
    if image.contains('@') {
        return image.to_owned();
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The container path a socket is mounted at, from a `unix://` URI variable.
fn socket_target(spec: &ModuleSpec, var: &str, default: &str) -> String {
    spec.env
        .get(var)
        .and_then(|u| u.strip_prefix("unix://"))
        .filter(|p| p.starts_with('/'))
        .unwrap_or(default)
        .to_owned()
}

/// Docker's zero time (`0001-01-01T00:00:00Z`) means "never".
fn docker_time(value: Option<&String>) -> Option<Timestamp> {
    let v = value?;
    if v.is_empty() || v.starts_with("0001-01-01") {
        return None;
    }
    Timestamp::parse(v).ok()
}

/// Maps a container state per reference §2.2.
pub fn map_status(
    status: Option<ContainerStateStatusEnum>,
    exit_code: Option<i64>,
) -> ModuleStatus {
    match status {
        Some(ContainerStateStatusEnum::RUNNING) => ModuleStatus::Running,
        Some(
            ContainerStateStatusEnum::CREATED
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING,
        ) => ModuleStatus::Stopped,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::REMOVING) => {
            if exit_code.unwrap_or(0) == 0 {
                ModuleStatus::Stopped
            } else {
                ModuleStatus::Failed
            }
        }
        Some(ContainerStateStatusEnum::DEAD) => ModuleStatus::Dead,
        _ => ModuleStatus::Unknown,
    }
}

/// Builds the create-container body for a spec.
pub fn container_body(
    spec: &ModuleSpec,
    network: &str,
    owner: &str,
) -> Result<ContainerCreateBody, RuntimeError> {
    let invalid = |reason: String| RuntimeError::InvalidSpec {
        module: spec.name.clone(),
        reason,
    };
    let mut body: ContainerCreateBody = match &spec.create_options {
        serde_json::Value::Null => ContainerCreateBody::default(),
        v @ serde_json::Value::Object(_) => {
            serde_json::from_value(v.clone()).map_err(|e| invalid(format!("createOptions: {e}")))?
        }
        _ => return Err(invalid("createOptions must be a JSON object".to_owned())),
    };
    body.image = Some(spec.image.clone());

    // Env: the spec's variables override createOptions' ones.
    let mut env: Vec<String> = body
        .env
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            !spec.env.contains_key(key)
        })
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    body.env = Some(env);

    // Labels: createOptions, then the spec's, then ours.
    let spec_json = serde_json::to_string(spec).map_err(|e| invalid(e.to_string()))?;
    let mut labels: HashMap<String, String> = body.labels.take().unwrap_or_default();
    labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(OWNER_LABEL.to_owned(), owner.to_owned());
    labels.insert(SPEC_LABEL.to_owned(), spec_json);
    body.labels = Some(labels);

    let mut host = body.host_config.take().unwrap_or_default();
    let mut binds = host.binds.take().unwrap_or_default();
    if let Some(sock) = &spec.workload_socket {
        let target = socket_target(spec, "IOTEDGE_WORKLOADURI", DEFAULT_WORKLOAD_PATH);
        binds.push(format!("{}:{target}", sock.display()));
    }
    if let Some(sock) = &spec.management_socket {
        let target = socket_target(spec, "IOTEDGE_MANAGEMENTURI", DEFAULT_MANAGEMENT_PATH);
        binds.push(format!("{}:{target}", sock.display()));
    }
    host.binds = (!binds.is_empty()).then_some(binds);
    let user_network = host
        .network_mode
        .as_deref()
        .filter(|m| !m.is_empty() && *m != "default")
        .map(str::to_owned);
    match user_network {
        Some(_) => {}
        None => {
            host.network_mode = Some(network.to_owned());
            let mut endpoints = body
                .networking_config
                .take()
                .and_then(|n| n.endpoints_config)
                .unwrap_or_default();
            let endpoint = endpoints.entry(network.to_owned()).or_default();
            // As IoT Edge: modules reach edgeHub under the device's hostname
            // (their IOTEDGE_GATEWAYHOSTNAME) on the module network.
            if spec.name == EDGE_HUB
                && let Some(host) = spec.env.get("EdgeDeviceHostName").filter(|h| !h.is_empty())
            {
                let aliases = endpoint.aliases.get_or_insert_with(Vec::new);
                if !aliases.contains(host) {
                    aliases.push(host.clone());
                }
            }
            body.networking_config = Some(NetworkingConfig {
                endpoints_config: Some(endpoints),
            });
        }
    }
    body.host_config = Some(host);
    Ok(body)
}

impl DockerRuntime {
    /// A runtime for the given engine. Does not connect yet.
    pub fn new(config: DockerConfig) -> Self {
        Self {
            config,
            client: tokio::sync::Mutex::new(None),
            network_ready: AtomicBool::new(false),
            pulls: Pulls::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The engine client, connecting (and negotiating the API version) on
    /// first use; [`RuntimeError::Unavailable`] while the engine is not there.
    pub async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let timeout = self.config.request_timeout.as_secs().max(1);
        let uri = self.config.uri.as_str();
        let docker = if let Some(path) = uri.strip_prefix("unix://") {
            if tokio::fs::metadata(path).await.is_err() {
                return Err(RuntimeError::Unavailable(format!(
                    "Docker socket {path} does not exist"
                )));
            }
            Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
        } else if let Some(rest) = uri.strip_prefix("tcp://") {
            Docker::connect_with_http(
                &format!("http://{rest}"),
                timeout,
                bollard::API_DEFAULT_VERSION,
            )
        } else if uri.starts_with("http://") {
            Docker::connect_with_http(uri, timeout, bollard::API_DEFAULT_VERSION)
        } else {
            return Err(RuntimeError::Unavailable(format!(
                "unsupported Docker URI {uri}"
            )));
        }
        .map_err(|e| RuntimeError::Unavailable(format!("{uri}: {e}")))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Unavailable(format!("{uri}: {e}")))?;
        *guard = Some(docker.clone());
        Ok(docker)
    }

    /// Creates the module network unless it exists.
    pub async fn ensure_network(&self) -> Result<(), RuntimeError> {
        if self.network_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let docker = self.client().await?;
        let name = self.config.network.as_str();
        match docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => {
                tracing::info!(network = name, "creating module network");
                let request = NetworkCreateRequest {
                    name: name.to_owned(),
                    driver: Some("bridge".to_owned()),
                    labels: Some(HashMap::from([(
                        OWNER_LABEL.to_owned(),
                        self.config.owner.clone(),
                    )])),
                    ..Default::default()
                };
                match docker.create_network(request).await {
                    Ok(_) => {}
                    // Created concurrently.
                    Err(e) if status_of(&e) == Some(409) => {}
                    Err(e) => return Err(general_error(e)),
                }
            }
            Err(e) => return Err(general_error(e)),
        }
        self.network_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the module network if this runtime's owner made it (its
    /// [`OWNER_LABEL`]); `Ok(false)` if there is none or it is someone
    /// else's. The engine refuses while containers are attached to it.
    pub async fn remove_network(&self) -> Result<bool, RuntimeError> {
        let docker = self.client().await?;
        let name = self.config.network.as_str();
        let net = match docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) => n,
            Err(e) if status_of(&e) == Some(404) => return Ok(false),
            Err(e) => return Err(general_error(e)),
        };
        let owner = net.labels.as_ref().and_then(|l| l.get(OWNER_LABEL));
        if owner != Some(&self.config.owner) {
            return Ok(false);
        }
        match docker.remove_network(name).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => return Ok(false),
            Err(e) => return Err(general_error(e)),
        }
        self.network_ready.store(false, Ordering::Release);
        Ok(true)
    }

    /// Removes an image by reference (and its untagged parents); `Ok(None)`
    /// if there is no such image, else the bytes its layers took.
    pub async fn remove_image(&self, reference: &str) -> Result<Option<u64>, RuntimeError> {
        let docker = self.client().await?;
        let size = match docker.inspect_image(reference).await {
            Ok(i) => i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(general_error(e)),
        };
        match docker
            .remove_image(reference, None::<RemoveImageOptions>, None)
            .await
        {
            Ok(_) => Ok(Some(size)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(general_error(e)),
        }
    }

    /// Inspects a container and checks it is one of ours.
    async fn inspect_ours(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<ContainerInspectResponse, RuntimeError> {
        let c = docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| container_error(name, e))?;
        let owner = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.labels.as_ref())
            .and_then(|l| l.get(OWNER_LABEL));
        if owner != Some(&self.config.owner) {
            return Err(RuntimeError::NotFound(name.to_owned()));
        }
        Ok(c)
    }

    fn module_state(&self, name: &str, c: ContainerInspectResponse) -> ModuleState {
        let config = c.config.unwrap_or_default();
        let labels = config.labels.unwrap_or_default();
        let spec = labels
            .get(SPEC_LABEL)
            .and_then(|s| serde_json::from_str::<ModuleSpec>(s).ok())
            .unwrap_or_else(|| {
                // Label missing or unreadable: rebuild what we can.
                let env = config
                    .env
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let labels: BTreeMap<String, String> = labels
                    .iter()
                    .filter(|(k, _)| k.as_str() != OWNER_LABEL && k.as_str() != SPEC_LABEL)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                ModuleSpec {
                    name: name.to_owned(),
                    image: config.image.unwrap_or_default(),
                    create_options: serde_json::json!({}),
                    env,
                    labels,
                    workload_socket: None,
                    management_socket: None,
                }
            });
        let state = c.state.unwrap_or_default();
        let status = map_status(state.status, state.exit_code);
        let exited_at = docker_time(state.finished_at.as_ref());
        let exit_code = match status {
            ModuleStatus::Running => None,
            _ if exited_at.is_some() => state.exit_code,
            _ => None,
        };
        let health = state.health.and_then(|h| h.status).and_then(|s| match s {
            HealthStatusEnum::STARTING => Some(Health::Starting),
            HealthStatusEnum::HEALTHY => Some(Health::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });
        ModuleState {
            spec,
            status,
            exit_code,
            started_at: docker_time(state.started_at.as_ref()),
            exited_at: if status == ModuleStatus::Running {
                None
            } else {
                exited_at
            },
            health,
            runtime_id: c.id,
            image_id: c.image,
        }
    }

    async fn stop_with(
        &self,
        docker: &Docker,
        name: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        // The call returns once the container is down: allow for the timeout.
        let client = docker
            .clone()
            .with_timeout(self.config.request_timeout + timeout + Duration::from_secs(5));
        client
            .stop_container(
                name,
                Some(StopContainerOptions {
                    t: Some(secs),
                    signal: None,
                }),
            )
            .await
            .map_err(|e| container_error(name, e))
    }
}

#[async_trait::async_trait]
impl ModuleRuntime for DockerRuntime {
    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let reference = with_default_tag(image);
        let credentials = auth.map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            serveraddress: Some(a.address.clone()),
            ..Default::default()
        });
        let options = CreateImageOptions {
            from_image: Some(reference.clone()),
            ..Default::default()
        };
        tracing::info!(image = %reference, "pulling image");
        let listed = self.pulls.begin(image);
        let pull = async {
            let mut stream = docker.create_image(Some(options), None, credentials);
            let mut log = PullLog::default();
            let mut layers = LayerProgress::default();
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| pull_error(image, e))?;
                if let Some(line) = log.line(&info) {
                    tracing::info!(image = %reference, "pull: {line}");
                }
                let detail = info.progress_detail.as_ref();
                layers.update(
                    info.id.as_deref().unwrap_or(""),
                    info.status.as_deref().unwrap_or(""),
                    detail.and_then(|p| p.current),
                    detail.and_then(|p| p.total),
                );
                listed.update(&layers);
                tracing::debug!(
                    image = %reference,
                    layer = info.id.as_deref().unwrap_or(""),
                    status = info.status.as_deref().unwrap_or(""),
                    current = info.progress_detail.as_ref().and_then(|p| p.current),
                    total = info.progress_detail.as_ref().and_then(|p| p.total),
                    "pull progress"
                );
            }
            Ok(())
        };
        match tokio::time::timeout(self.config.pull_timeout, pull).await {
            Ok(Ok(())) => {
                tracing::info!(image = %reference, "image pulled");
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(image = %reference, error = %e, "image pull failed");
                Err(e)
            }
            Err(_) => Err(RuntimeError::PullFailed {
                image: image.to_owned(),
                reason: format!("timed out after {:?}", self.config.pull_timeout),
            }),
        }
    }

    async fn create(&self, spec: &ModuleSpec) -> Result<(), RuntimeError> {
        let body = container_body(spec, &self.config.network, &self.config.owner)?;
        for sock in [&spec.workload_socket, &spec.management_socket]
            .into_iter()
            .flatten()
        {
            if tokio::fs::symlink_metadata(sock).await.is_err() {
                return Err(RuntimeError::InvalidSpec {
                    module: spec.name.clone(),
                    reason: format!(
                        "socket {} does not exist; create it before the module",
                        sock.display()
                    ),
                });
            }
        }
        let docker = self.client().await?;
        if body
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            == Some(self.config.network.as_str())
        {
            self.ensure_network().await?;
        }
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        match docker.create_container(Some(options), body).await {
            Ok(r) => {
                for w in r.warnings {
                    tracing::warn!(module = %spec.name, warning = %w, "docker create warning");
                }
                Ok(())
            }
            Err(e) if is_unreachable(&e) => Err(RuntimeError::Unavailable(e.to_string())),
            Err(e) => Err(match status_of(&e) {
                Some(409) => RuntimeError::AlreadyExists(spec.name.clone()),
                Some(404) => RuntimeError::ImageNotFound(spec.image.clone()),
                Some(400) => RuntimeError::InvalidSpec {
                    module: spec.name.clone(),
                    reason: message_of(&e),
                },
                _ => RuntimeError::Other(format!("{}: {}", spec.name, message_of(&e))),
            }),
        }
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        self.inspect_ours(&docker, name).await?;
        docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| container_error(name, e))
    }

    async fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        self.inspect_ours(&docker, name).await?;
        self.stop_with(&docker, name, timeout).await
    }

    async fn restart(&self, name: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        self.inspect_ours(&docker, name).await?;
        let timeout = self.config.stop_timeout;
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        docker
            .clone()
            .with_timeout(self.config.request_timeout + timeout + Duration::from_secs(5))
            .restart_container(
                name,
                Some(RestartContainerOptions {
                    t: Some(secs),
                    signal: None,
                }),
            )
            .await
            .map_err(|e| container_error(name, e))
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let c = self.inspect_ours(&docker, name).await?;
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        if running {
            match self
                .stop_with(&docker, name, self.config.stop_timeout)
                .await
            {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
            .map_err(|e| container_error(name, e))
    }

    async fn get(&self, name: &str) -> Result<ModuleState, RuntimeError> {
        let docker = self.client().await?;
        let c = self.inspect_ours(&docker, name).await?;
        Ok(self.module_state(name, c))
    }

    async fn list(&self) -> Result<Vec<ModuleState>, RuntimeError> {
        let docker = self.client().await?;
        let filter = format!("{OWNER_LABEL}={}", self.config.owner);
        let containers = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("label".to_owned(), vec![filter])])),
                ..Default::default()
            }))
            .await
            .map_err(general_error)?;
        let mut states = Vec::with_capacity(containers.len());
        for summary in containers {
            let Some(id) = summary.id else { continue };
            let name = summary
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.clone());
            match self.inspect_ours(&docker, &id).await {
                Ok(c) => states.push(self.module_state(&name, c)),
                // Removed in between.
                Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        states.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(states)
    }

    async fn logs(&self, name: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        let docker = self.client().await?;
        self.inspect_ours(&docker, name).await?;
        let secs = |t: Timestamp| i32::try_from(t.as_millis().div_euclid(1000)).unwrap_or(i32::MAX);
        let query = LogsOptions {
            follow: options.follow,
            stdout: true,
            stderr: true,
            // Whole seconds here; the exact bounds are applied below.
            since: options.since.map_or(0, secs),
            until: options.until.map_or(0, |u| secs(u).saturating_add(1)),
            // Always ask for timestamps, to filter at millisecond precision.
            timestamps: true,
            tail: options
                .tail
                .map_or_else(|| "all".to_owned(), |n| n.to_string()),
        };
        let since = options.since;
        let until = options.until;
        let timestamps = options.timestamps;
        let module = name.to_owned();
        let stream = docker.logs(name, Some(query)).flat_map(move |item| {
            let out: Vec<Result<Bytes, RuntimeError>> = match item {
                Ok(chunk) => frame_lines(chunk, since, until, timestamps)
                    .into_iter()
                    .map(Ok)
                    .collect(),
                Err(e) => vec![Err(container_error(&module, e))],
            };
            futures_util::stream::iter(out)
        });
        Ok(stream.boxed())
    }

    async fn image_digests(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        let docker = self.client().await?;
        let reference = with_default_tag(image);
        let inspect = match docker.inspect_image(&reference).await {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::ImageNotFound(reference));
            }
            Err(e) => return Err(general_error(e)),
        };
        // The id is the digest of the image config; the repo digests are the
        // registry manifest digests that `name@sha256:…` references name.
        let mut digests: Vec<String> = inspect.id.into_iter().collect();
        for d in inspect.repo_digests.unwrap_or_default() {
            if let Some((_, digest)) = d.rsplit_once('@')
                && !digests.iter().any(|x| x == digest)
            {
                digests.push(digest.to_owned());
            }
        }
        Ok(Some(digests))
    }

    async fn pulls(&self) -> Result<Vec<PullStatus>, RuntimeError> {
        Ok(self.pulls.list())
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        let docker = self.client().await?;
        let info = docker.info().await.map_err(general_error)?;
        Ok(RuntimeInfo {
            kind: "docker".to_owned(),
            version: info.server_version.unwrap_or_default(),
            os_type: info
                .os_type
                .unwrap_or_else(|| std::env::consts::OS.to_owned()),
            architecture: info
                .architecture
                .unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
        })
    }
}

/// Folds Docker's pull progress stream into lines worth logging at info:
/// one per layer status change (`Pulling fs layer`, `Downloading`,
/// `Pull complete`, …) and every message about the whole image (`Digest: …`,
/// `Status: …`). Byte counts repeat the same status many times a second and
/// are left to debug logging.
#[derive(Debug, Default)]
struct PullLog {
    layers: HashMap<String, String>,
}

impl PullLog {
    fn line(&mut self, info: &CreateImageInfo) -> Option<String> {
        let status = info.status.as_deref().filter(|s| !s.is_empty())?;
        match info.id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => {
                if self.layers.get(id).is_some_and(|s| s == status) {
                    return None;
                }
                self.layers.insert(id.to_owned(), status.to_owned());
                Some(format!("{id}: {status}"))
            }
            None => Some(status.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests;
