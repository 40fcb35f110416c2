//! [`ManagementRuntime`]: the [`ModuleRuntime`] trait over verged's management
//! API (reference §7.3), so the agent runs its modules through the daemon.
//!
//! verged then gives every module its identity, its own workload socket and the
//! `IOTEDGE_*` environment (§7.4); the agent only names what to run.
//!
//! # Calls
//!
//! | trait call | request |
//! |---|---|
//! | `list` | `GET /modules` |
//! | `get` | `GET /modules/{name}` |
//! | `create` | `POST /modules` with `imagePullPolicy: never` |
//! | `start` / `stop` / `restart` | `POST /modules/{name}/start` … |
//! | `remove` | `DELETE /modules/{name}` |
//! | `logs` | `GET /modules/{name}/logs?follow&tail&since&until&timestamps`, streamed |
//! | `info` | `GET /systeminfo` (`server_version` is `"<kind> <version>"`) |
//! | `pull` | `POST /modules/{placeholder}/prepareupdate` with `imagePullPolicy: on-create` |
//! | `pull_for` | the same for the named module |
//! | `pulls` / `pull_status` | `GET /images/pulls` |
//!
//! plus [`ManagementRuntime::update`] (`PUT /modules/{name}?start=…`) and
//! [`ManagementRuntime::prepare_update`] for callers that know the module.
//!
//! # Pulling
//!
//! The agent pulls (for `imagePullPolicy: on-create`) *before* it stops the old
//! module, so a failed pull leaves it running; then it removes the old module
//! and creates the new one. Over the management API that is: `pull` →
//! `prepareupdate` (verged pulls and nothing else), then `stop`, `DELETE`, and
//! `POST /modules` with `imagePullPolicy: never` (the image is there already;
//! a module whose policy is `never` is not pulled at all, as the manifest
//! says). The agent pulls with `pull_for`, naming the module, so verged's
//! `GET /images/pulls` says whose pull it is (the agent reports the module
//! as `downloading` from it, `verge list` shows it); the trait's bare `pull`
//! sends `prepareupdate` for the placeholder module [`PULL_PLACEHOLDER`];
//! verged only checks that the body names the same module as the path.
//!
//! # What verged keeps
//!
//! The spec the agent compares goes through the round trip: name, image,
//! createOptions and the `labels` extension (the agent's `net.verge.*` labels,
//! hence its ownership and spec hash). `env` comes back as the module got it,
//! with verged's `IOTEDGE_*` variables; `workload_socket` is read back from
//! `IOTEDGE_WORKLOADURI`. verged reports the Docker healthcheck's verdict
//! (`runtimeStatus.health`, a Verge extension) and answers
//! `GET /images/digests`, so `on-unhealthy` restarts and digest pins work
//! through verged as with Docker directly; the image id is `None`.
//!
//! # Errors
//!
//! Connection failures and timeouts → [`RuntimeError::Unavailable`] (the agent
//! retries on its next reconcile); 404 → `NotFound` (`ImageNotFound` for
//! create/pull), 409 → `AlreadyExists`, 400 → `InvalidSpec`, 502 →
//! `PullFailed`, 503 → `Unavailable`, anything else → `Other` with verged's
//! `message`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use verge_core::sas::url_encode;
use verge_core::time::Timestamp;
use verge_runtime::{
    Health, LogOptions, LogStream, ModuleRuntime, ModuleSpec, ModuleState, ModuleStatus,
    PullStatus, RegistryAuth, RuntimeError, RuntimeInfo,
};
use verge_workload::api::{
    ErrorResponse, ImageDigests, ImagePulls, MANAGEMENT_API_VERSION, ModuleConfig, ModuleDetails,
    ModuleList, ModuleSettings, ModuleSpecJson, RegistryAuthJson, SystemInfo,
};

/// Module name used in the `prepareupdate` path for [`ModuleRuntime::pull`],
/// whose signature names no module.
pub const PULL_PLACEHOLDER: &str = "verge-agent-pull";

/// Environment variable naming the management socket (`unix:///…`).
pub const MANAGEMENT_URI_ENV: &str = "IOTEDGE_MANAGEMENTURI";

/// Default timeout of one call (verged's own stop grace is 30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(75);

/// Timeout of a pull (big images over slow links).
pub const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A [`ModuleRuntime`] that is verged's management API. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ManagementRuntime {
    socket: PathBuf,
    timeout: Duration,
    pull_timeout: Duration,
}

/// What an error status is about, for mapping it to a [`RuntimeError`].
#[derive(Debug, Clone, Copy)]
struct Subject<'a> {
    module: Option<&'a str>,
    image: Option<&'a str>,
}

impl<'a> Subject<'a> {
    fn module(name: &'a str) -> Self {
        Self {
            module: Some(name),
            image: None,
        }
    }
    fn image(module: Option<&'a str>, image: &'a str) -> Self {
        Self {
            module,
            image: Some(image),
        }
    }
    const NONE: Subject<'static> = Subject {
        module: None,
        image: None,
    };
}

fn status_error(status: u16, message: String, s: Subject<'_>) -> RuntimeError {
    let what = s.module.or(s.image).unwrap_or_default().to_owned();
    match status {
        404 => match (s.image, s.module) {
            (Some(image), _) => RuntimeError::ImageNotFound(image.to_owned()),
            (None, Some(m)) => RuntimeError::NotFound(m.to_owned()),
            (None, None) => RuntimeError::Other(format!("HTTP 404: {message}")),
        },
        409 => RuntimeError::AlreadyExists(what),
        400 => RuntimeError::InvalidSpec {
            module: what,
            reason: message,
        },
        502 => {
            let image = s.image.unwrap_or_default().to_owned();
            // verged's message is its own `PullFailed` already ("pulling
            // image X failed: why"): keep only the why, or it says it twice.
            let prefix = format!("pulling image {image} failed: ");
            let reason = match message.strip_prefix(&prefix) {
                Some(why) => why.to_owned(),
                None => message,
            };
            RuntimeError::PullFailed { image, reason }
        }
        503 => RuntimeError::Unavailable(message),
        _ => RuntimeError::Other(format!("HTTP {status}: {message}")),
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorResponse>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned())
}

fn parse_status(s: &str) -> ModuleStatus {
    match s.to_ascii_lowercase().as_str() {
        "running" => ModuleStatus::Running,
        "stopped" => ModuleStatus::Stopped,
        "failed" => ModuleStatus::Failed,
        "dead" => ModuleStatus::Dead,
        _ => ModuleStatus::Unknown,
    }
}

fn parse_time(s: Option<&str>) -> Option<Timestamp> {
    s.filter(|s| !s.is_empty())
        .and_then(|s| Timestamp::parse(s).ok())
}

/// Maps one module as verged describes it to the trait's [`ModuleState`].
pub fn state_from_details(d: ModuleDetails) -> ModuleState {
    let env: BTreeMap<String, String> =
        d.config.env.into_iter().map(|e| (e.key, e.value)).collect();
    let workload_socket = env
        .get("IOTEDGE_WORKLOADURI")
        .and_then(|u| u.strip_prefix("unix://"))
        .map(PathBuf::from);
    let exit = d.status.exit_status;
    ModuleState {
        spec: ModuleSpec {
            name: d.name,
            image: d.config.settings.image,
            create_options: d.config.settings.create_options,
            env,
            labels: d.labels,
            workload_socket,
            management_socket: None,
        },
        status: parse_status(&d.status.runtime_status.status),
        exit_code: exit
            .as_ref()
            .and_then(|e| e.status_code.trim().parse::<i64>().ok()),
        started_at: parse_time(d.status.start_time.as_deref()),
        exited_at: parse_time(exit.as_ref().map(|e| e.exit_time.as_str())),
        health: match d.status.runtime_status.health.as_deref() {
            Some("starting") => Some(Health::Starting),
            Some("healthy") => Some(Health::Healthy),
            Some("unhealthy") => Some(Health::Unhealthy),
            _ => None,
        },
        runtime_id: Some(d.id).filter(|id| !id.is_empty()),
        image_id: None,
    }
}

/// The management API body for a trait spec. `env` is sent as is; verged adds
/// (and overrides) the `IOTEDGE_*` variables.
pub fn spec_json(spec: &ModuleSpec, image_pull_policy: &str) -> ModuleSpecJson {
    ModuleSpecJson {
        name: spec.name.clone(),
        kind: "docker".to_owned(),
        image_pull_policy: Some(image_pull_policy.to_owned()),
        config: ModuleConfig {
            settings: ModuleSettings {
                image: spec.image.clone(),
                create_options: spec.create_options.clone(),
            },
            env: spec
                .env
                .iter()
                .map(|(k, v)| verge_workload::api::EnvVar {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            auth: None,
        },
        labels: spec.labels.clone(),
    }
}

/// Serialises a spec body, with the registry credentials (which the shared
/// `ModuleConfig` type never serialises, so that verged never returns them).
fn body_with_auth(
    spec: &ModuleSpecJson,
    auth: Option<&RegistryAuth>,
) -> Result<Vec<u8>, RuntimeError> {
    let mut v = serde_json::to_value(spec)
        .map_err(|e| RuntimeError::Other(format!("serialising the module spec: {e}")))?;
    if let (Some(a), Some(config)) = (auth, v.get_mut("config").and_then(|c| c.as_object_mut())) {
        let json = RegistryAuthJson {
            serveraddress: a.address.clone(),
            username: a.username.clone(),
            password: a.password.clone(),
        };
        let json = serde_json::to_value(json)
            .map_err(|e| RuntimeError::Other(format!("serialising credentials: {e}")))?;
        config.insert("auth".into(), json);
    }
    serde_json::to_vec(&v).map_err(|e| RuntimeError::Other(format!("serialising: {e}")))
}

/// The `logs` query string (without `api-version`).
pub fn logs_query(o: &LogOptions) -> String {
    let mut q = format!(
        "follow={}&tail={}&timestamps={}",
        o.follow,
        o.tail.map_or_else(|| "all".to_owned(), |n| n.to_string()),
        o.timestamps
    );
    if let Some(t) = o.since {
        q.push_str(&format!("&since={}", url_encode(&t.to_iso8601())));
    }
    if let Some(t) = o.until {
        q.push_str(&format!("&until={}", url_encode(&t.to_iso8601())));
    }
    q
}

/// Splits a byte stream into whole lines (the last one may lack its `\n`);
/// `conn` (the connection) lives as long as the stream.
fn lines<S>(body: S, conn: Option<ConnGuard>) -> LogStream
where
    S: futures_core::Stream<Item = Result<Bytes, RuntimeError>> + Send + 'static,
{
    struct St<S> {
        body: std::pin::Pin<Box<S>>,
        buf: BytesMut,
        done: bool,
        _conn: Option<ConnGuard>,
    }
    let st = St {
        body: Box::pin(body),
        buf: BytesMut::new(),
        done: false,
        _conn: conn,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(i) = st.buf.iter().position(|b| *b == b'\n') {
                let line = st.buf.split_to(i + 1).freeze();
                return Some((Ok(line), st));
            }
            if st.done {
                if st.buf.is_empty() {
                    return None;
                }
                let rest = st.buf.split().freeze();
                return Some((Ok(rest), st));
            }
            match st.body.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    return Some((Err(e), st));
                }
                None => st.done = true,
            }
        }
    }))
}

/// Aborts the connection task when the response (stream) is dropped.
struct ConnGuard(tokio::task::AbortHandle);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ManagementRuntime {
    /// A client of the management socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
            pull_timeout: PULL_TIMEOUT,
        }
    }

    /// From a `unix:///path` URI (the form of `IOTEDGE_MANAGEMENTURI`).
    pub fn from_uri(uri: &str) -> Result<Self, RuntimeError> {
        match uri.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(Self::new(path)),
            _ => Err(RuntimeError::Unavailable(format!(
                "management URI {uri:?} is not unix:///<absolute path>"
            ))),
        }
    }

    /// From `IOTEDGE_MANAGEMENTURI`; `None` when it is not set.
    pub fn from_env() -> Option<Result<Self, RuntimeError>> {
        let uri = std::env::var(MANAGEMENT_URI_ENV).ok()?;
        Some(Self::from_uri(&uri))
    }

    /// Sets the timeout of one call (pulls excepted).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The management socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the response head with its streaming body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(hyper::Response<Incoming>, ConnGuard), RuntimeError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::Unavailable(format!(
                "management socket {}: {what}: {e}",
                self.socket.display()
            ))
        };
        let sep = if query.is_empty() { "" } else { "&" };
        let pq = format!("{path}?api-version={MANAGEMENT_API_VERSION}{sep}{query}");
        let work = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| unavailable("connect", &e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unavailable("handshake", &e))?;
            let guard = ConnGuard(tokio::spawn(conn).abort_handle());
            let mut req = Request::builder()
                .method(method)
                .uri(pq.as_str())
                .header("Host", "localhost");
            if body.is_some() {
                req = req.header("Content-Type", "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| RuntimeError::Other(format!("building the request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unavailable("request", &e))?;
            Ok((resp, guard))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| unavailable(&format!("{method} {path}"), &"no answer in time"))?
    }

    /// One call; the whole body, or the error status mapped for `subject`.
    async fn call(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: Option<Vec<u8>>,
        subject: Subject<'_>,
        timeout: Duration,
    ) -> Result<Bytes, RuntimeError> {
        let started = tokio::time::Instant::now();
        let (resp, _guard) = self.send(method, path, query, body, timeout).await?;
        let status = resp.status().as_u16();
        let left = timeout.saturating_sub(started.elapsed());
        let bytes = tokio::time::timeout(left, resp.into_body().collect())
            .await
            .map_err(|_| RuntimeError::Unavailable(format!("{method} {path}: body timed out")))?
            .map_err(|e| RuntimeError::Unavailable(format!("{method} {path}: {e}")))?
            .to_bytes();
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            Err(status_error(status, error_message(&bytes), subject))
        }
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        subject: Subject<'_>,
    ) -> Result<T, RuntimeError> {
        let bytes = self
            .call("GET", path, "", None, subject, self.timeout)
            .await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Other(format!("GET {path}: unexpected answer: {e}")))
    }

    fn module_path(name: &str, action: &str) -> String {
        format!("/modules/{}{action}", url_encode(name))
    }

    /// `PUT /modules/{name}?start=…`: verged stops and removes the module,
    /// pulls per `image_pull_policy` (`on-create`/`never`), creates it and
    /// (with `start`) starts it.
    pub async fn update(
        &self,
        spec: &ModuleSpec,
        image_pull_policy: &str,
        auth: Option<&RegistryAuth>,
        start: bool,
    ) -> Result<(), RuntimeError> {
        let body = body_with_auth(&spec_json(spec, image_pull_policy), auth)?;
        let timeout = if image_pull_policy == "never" {
            self.timeout
        } else {
            self.pull_timeout
        };
        self.call(
            "PUT",
            &Self::module_path(&spec.name, ""),
            &format!("start={start}"),
            Some(body),
            Subject::image(Some(&spec.name), &spec.image),
            timeout,
        )
        .await
        .map(drop)
    }

    /// `POST /modules/{name}/prepareupdate`: pulls the image of `spec`.
    pub async fn prepare_update(
        &self,
        spec: &ModuleSpec,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        let body = body_with_auth(&spec_json(spec, "on-create"), auth)?;
        self.call(
            "POST",
            &Self::module_path(&spec.name, "/prepareupdate"),
            "",
            Some(body),
            Subject::image(Some(&spec.name), &spec.image),
            self.pull_timeout,
        )
        .await
        .map(drop)
    }

    /// `GET /systeminfo`.
    pub async fn system_info(&self) -> Result<SystemInfo, RuntimeError> {
        self.call_json("/systeminfo", Subject::NONE).await
    }

    /// `GET /systeminfo/resources` (verged samples CPU for a quarter second).
    pub async fn system_resources(
        &self,
    ) -> Result<verge_workload::api::SystemResources, RuntimeError> {
        self.call_json("/systeminfo/resources", Subject::NONE).await
    }

    /// `GET /systeminfo/agent`: the agent verged supervises (this one).
    pub async fn agent_info(&self) -> Result<verge_workload::api::AgentInfo, RuntimeError> {
        self.call_json("/systeminfo/agent", Subject::NONE).await
    }
}

#[async_trait::async_trait]
impl ModuleRuntime for ManagementRuntime {
    async fn image_digests(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        let query = format!("image={}", url_encode(image));
        let bytes = self
            .call(
                "GET",
                "/images/digests",
                &query,
                None,
                Subject::image(None, image),
                self.timeout,
            )
            .await?;
        let answer: ImageDigests = serde_json::from_slice(&bytes).map_err(|e| {
            RuntimeError::Other(format!("GET /images/digests: unexpected answer: {e}"))
        })?;
        Ok(answer.digests)
    }

    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), RuntimeError> {
        self.pull_for(PULL_PLACEHOLDER, image, auth).await
    }

    async fn pull_for(
        &self,
        module: &str,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        let spec = ModuleSpec {
            name: module.to_owned(),
            image: image.to_owned(),
            create_options: serde_json::json!({}),
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            workload_socket: None,
            management_socket: None,
        };
        let body = body_with_auth(&spec_json(&spec, "on-create"), auth)?;
        self.call(
            "POST",
            &Self::module_path(module, "/prepareupdate"),
            "",
            Some(body),
            Subject::image(None, image),
            self.pull_timeout,
        )
        .await
        .map(drop)
    }

    async fn pulls(&self) -> Result<Vec<PullStatus>, RuntimeError> {
        let answer: ImagePulls = self.call_json("/images/pulls", Subject::NONE).await?;
        Ok(answer.pulls.into_iter().map(|p| p.progress).collect())
    }

    async fn pull_status(
        &self,
        module: &str,
        image: &str,
    ) -> Result<Option<PullStatus>, RuntimeError> {
        // verged lists the image that runs, which for Microsoft's system
        // images is not the one named; the module name finds it either way.
        let answer: ImagePulls = self.call_json("/images/pulls", Subject::NONE).await?;
        let pulls = answer.pulls;
        let by_module = pulls
            .iter()
            .position(|p| p.modules.iter().any(|m| m == module));
        let i = by_module.or_else(|| pulls.iter().position(|p| p.progress.image == image));
        Ok(i.and_then(|i| pulls.into_iter().nth(i)).map(|p| p.progress))
    }

    async fn create(&self, spec: &ModuleSpec) -> Result<(), RuntimeError> {
        let body = body_with_auth(&spec_json(spec, "never"), None)?;
        self.call(
            "POST",
            "/modules",
            "",
            Some(body),
            Subject::image(Some(&spec.name), &spec.image),
            self.timeout,
        )
        .await
        .map(drop)
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let path = Self::module_path(name, "/start");
        let s = Subject::module(name);
        self.call("POST", &path, "", None, s, self.timeout)
            .await
            .map(drop)
    }

    /// verged applies its own grace (30 s); `timeout` only bounds the wait.
    async fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let path = Self::module_path(name, "/stop");
        let s = Subject::module(name);
        let wait = self.timeout.max(timeout + Duration::from_secs(5));
        self.call("POST", &path, "", None, s, wait).await.map(drop)
    }

    async fn restart(&self, name: &str) -> Result<(), RuntimeError> {
        let path = Self::module_path(name, "/restart");
        let s = Subject::module(name);
        self.call("POST", &path, "", None, s, self.timeout)
            .await
            .map(drop)
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let path = Self::module_path(name, "");
        let s = Subject::module(name);
        self.call("DELETE", &path, "", None, s, self.timeout)
            .await
            .map(drop)
    }

    async fn get(&self, name: &str) -> Result<ModuleState, RuntimeError> {
        let d: ModuleDetails = self
            .call_json(&Self::module_path(name, ""), Subject::module(name))
            .await?;
        Ok(state_from_details(d))
    }

    async fn list(&self) -> Result<Vec<ModuleState>, RuntimeError> {
        let l: ModuleList = self.call_json("/modules", Subject::NONE).await?;
        Ok(l.modules.into_iter().map(state_from_details).collect())
    }

    async fn logs(&self, name: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        let path = Self::module_path(name, "/logs");
        let (resp, guard) = self
            .send("GET", &path, &logs_query(options), None, self.timeout)
            .await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(status_error(
                status,
                error_message(&body),
                Subject::module(name),
            ));
        }
        let module = name.to_owned();
        let body = resp
            .into_body()
            .into_data_stream()
            .map(move |r| r.map_err(|e| RuntimeError::Other(format!("logs of {module}: {e}"))));
        Ok(lines(body, Some(guard)))
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        let s = self.system_info().await?;
        let (kind, version) = s
            .server_version
            .split_once(' ')
            .map_or((s.server_version.as_str(), ""), |(k, v)| (k, v.trim()));
        Ok(RuntimeInfo {
            kind: kind.to_owned(),
            version: version.to_owned(),
            os_type: s.os_type,
            architecture: s.architecture,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_workload::api::{EnvVar, ExitStatus, ModuleStatusJson, RuntimeStatus};

    fn status_name(s: ModuleStatus) -> &'static str {
        match s {
            ModuleStatus::Running => "running",
            ModuleStatus::Stopped => "stopped",
            ModuleStatus::Failed => "failed",
            ModuleStatus::Dead => "dead",
            ModuleStatus::Unknown => "unknown",
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            ModuleStatus::Running,
            ModuleStatus::Stopped,
            ModuleStatus::Failed,
            ModuleStatus::Dead,
            ModuleStatus::Unknown,
        ] {
            assert_eq!(parse_status(status_name(s)), s);
        }
        assert_eq!(parse_status("Running"), ModuleStatus::Running);
        assert_eq!(parse_status("paused"), ModuleStatus::Unknown);
    }

    #[test]
    fn error_statuses_map_to_runtime_errors() {
        let m = Subject::module("a");
        let c = Subject::image(Some("a"), "img");
        assert_eq!(
            status_error(404, "x".into(), m),
            RuntimeError::NotFound("a".into())
        );
        assert_eq!(
            status_error(404, "x".into(), c),
            RuntimeError::ImageNotFound("img".into())
        );
        assert_eq!(
            status_error(409, "x".into(), c),
            RuntimeError::AlreadyExists("a".into())
        );
        assert!(matches!(
            status_error(400, "bad".into(), c),
            RuntimeError::InvalidSpec { module, reason } if module == "a" && reason == "bad"
        ));
        assert!(matches!(
            status_error(502, "no".into(), c),
            RuntimeError::PullFailed { image, .. } if image == "img"
        ));
        // verged's message is a PullFailed's own text: said once.
        let e = status_error(
            502,
            "pulling image img failed: registry unreachable".into(),
            c,
        );
        assert_eq!(
            e.to_string(),
            "pulling image img failed: registry unreachable"
        );
        assert!(matches!(
            status_error(503, "later".into(), m),
            RuntimeError::Unavailable(_)
        ));
        assert!(matches!(
            status_error(403, "no".into(), m),
            RuntimeError::Other(msg) if msg.contains("403")
        ));
        assert_eq!(error_message(br#"{"message":"why"}"#), "why");
        assert_eq!(error_message(b"plain\n"), "plain");
    }

    #[test]
    fn details_map_to_state() {
        let d = ModuleDetails {
            id: "42".into(),
            name: "filter".into(),
            kind: "process".into(),
            config: ModuleConfig {
                settings: ModuleSettings {
                    image: "/bin/sh".into(),
                    create_options: serde_json::json!({"Cmd": ["-c", "true"]}),
                },
                env: vec![
                    EnvVar {
                        key: "IOTEDGE_WORKLOADURI".into(),
                        value: "unix:///h/mnt/filter.sock".into(),
                    },
                    EnvVar {
                        key: "A".into(),
                        value: "1".into(),
                    },
                ],
                auth: None,
            },
            status: ModuleStatusJson {
                start_time: Some("2026-01-02T03:04:05.000Z".into()),
                exit_status: Some(ExitStatus {
                    exit_time: "2026-01-02T03:04:06.500Z".into(),
                    status_code: "3".into(),
                }),
                runtime_status: RuntimeStatus {
                    status: "failed".into(),
                    description: None,
                    health: None,
                },
            },
            labels: BTreeMap::from([("net.verge.owner".into(), "verge-agent".into())]),
        };
        let s = state_from_details(d);
        assert_eq!(s.spec.name, "filter");
        assert_eq!(s.status, ModuleStatus::Failed);
        assert_eq!(s.exit_code, Some(3));
        assert_eq!(
            s.exited_at
                .map(|t| t.as_millis() - s.started_at.unwrap().as_millis()),
            Some(1500)
        );
        assert_eq!(s.runtime_id.as_deref(), Some("42"));
        assert_eq!(
            s.spec.workload_socket,
            Some(PathBuf::from("/h/mnt/filter.sock"))
        );
        assert_eq!(s.spec.labels["net.verge.owner"], "verge-agent");
        assert_eq!(s.spec.env["A"], "1");
    }

    #[test]
    fn bodies_carry_policy_labels_and_credentials() {
        let spec = ModuleSpec {
            name: "m".into(),
            image: "reg.example/m:1".into(),
            create_options: serde_json::json!({}),
            env: BTreeMap::from([("K".into(), "V".into())]),
            labels: BTreeMap::from([("net.verge.spec-hash".into(), "abc".into())]),
            workload_socket: None,
            management_socket: None,
        };
        let auth = RegistryAuth {
            address: "reg.example".into(),
            username: "u".into(),
            password: "p".into(),
        };
        let body = body_with_auth(&spec_json(&spec, "never"), Some(&auth)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["imagePullPolicy"], "never");
        assert_eq!(v["labels"]["net.verge.spec-hash"], "abc");
        assert_eq!(v["config"]["env"][0]["key"], "K");
        assert_eq!(v["config"]["auth"]["serveraddress"], "reg.example");
        assert_eq!(v["config"]["auth"]["password"], "p");
        // verged parses it back, credentials included
        let back: ModuleSpecJson = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.config.auth.unwrap().username, "u");
    }

    #[test]
    fn log_queries() {
        assert_eq!(
            logs_query(&LogOptions::default()),
            "follow=false&tail=all&timestamps=false"
        );
        let q = logs_query(&LogOptions {
            follow: true,
            tail: Some(5),
            since: Some(Timestamp::from_millis(0)),
            until: None,
            timestamps: true,
        });
        assert!(q.starts_with("follow=true&tail=5&timestamps=true&since=1970-01-01T00"));
        assert!(!q.contains(':'), "{q}");
    }

    #[test]
    fn uris() {
        assert_eq!(
            ManagementRuntime::from_uri("unix:///run/mgmt.sock")
                .unwrap()
                .socket(),
            Path::new("/run/mgmt.sock")
        );
        assert!(ManagementRuntime::from_uri("http://localhost:15580").is_err());
        assert!(ManagementRuntime::from_uri("unix://relative").is_err());
    }

    #[tokio::test]
    async fn lines_are_reassembled() {
        let chunks: Vec<Result<Bytes, RuntimeError>> = vec![
            Ok(Bytes::from_static(b"a\nb")),
            Ok(Bytes::from_static(b"c\n")),
            Ok(Bytes::from_static(b"d")),
        ];
        let out: Vec<Bytes> = lines(futures_util::stream::iter(chunks), None)
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(out, vec!["a\n", "bc\n", "d"]);
    }

    #[tokio::test]
    async fn missing_socket_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ManagementRuntime::new(dir.path().join("none.sock"));
        assert!(matches!(rt.list().await, Err(RuntimeError::Unavailable(_))));
    }
}
