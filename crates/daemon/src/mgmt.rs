//! The management API (reference §7.3), for the agent only.
//!
//! Only the agent is given the management socket (`IOTEDGE_MANAGEMENTURI`);
//! the socket file is mode 0660. In addition, mutating calls (everything but
//! `GET`) are refused with 403 unless the caller's peer uid (`SO_PEERCRED`)
//! is root or verged's own uid. With the process backend the agent and the
//! modules share verged's uid, so there "access to the socket = agent".

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::StreamExt as _;
use verge_core::id::ModuleId;
use verge_core::time::Timestamp;
use verge_runtime::{
    LogOptions, ModuleRuntime, ModuleSpec, ModuleState, ModuleStatus, RegistryAuth, RuntimeError,
};

use crate::api::{
    CreateIdentityRequest, EnvVar, ExitStatus, IdentityJson, IdentityList, ModuleConfig,
    ModuleDetails, ModuleList, ModuleSettings, ModuleSpecJson, ModuleStatusJson, ProvisioningInfo,
    RuntimeStatus, SystemInfo, UpdateIdentityRequest,
};
use crate::env::{EnvContext, module_env};
use crate::http::{ApiError, PeerCred, json_response, parse_body, require_api_version};
use crate::keys::{StoreError, canonical_module_id};
use crate::workload::{DaemonState, WorkloadSockets};

/// How long `stop` waits before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Management API state.
#[derive(Clone)]
pub struct MgmtState {
    /// Shared daemon state.
    pub daemon: Arc<DaemonState>,
    /// The module runtime.
    pub runtime: Arc<dyn ModuleRuntime>,
    /// Workload sockets (created with identities).
    pub sockets: Arc<WorkloadSockets>,
    /// Environment facts.
    pub env: EnvContext,
    /// Uid allowed to mutate (besides root).
    pub allowed_uid: u32,
}

/// The management router.
pub fn router(state: MgmtState) -> Router {
    Router::new()
        .route("/modules", get(list_modules).post(create_module))
        .route(
            "/modules/{name}",
            get(get_module).put(update_module).delete(delete_module),
        )
        .route("/modules/{name}/prepareupdate", post(prepare_update))
        .route("/modules/{name}/start", post(start_module))
        .route("/modules/{name}/stop", post(stop_module))
        .route("/modules/{name}/restart", post(restart_module))
        .route("/modules/{name}/logs", get(module_logs))
        .route("/identities", get(list_identities).post(create_identity))
        .route("/identities/", get(list_identities).post(create_identity))
        .route(
            "/identities/{name}",
            put(update_identity).delete(delete_identity),
        )
        .route("/systeminfo", get(system_info))
        .fallback(|| async { ApiError::not_found("no such management API path") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_caller,
        ))
        .layer(axum::middleware::from_fn(require_api_version))
        .with_state(state)
}

async fn check_caller(State(state): State<MgmtState>, req: Request, next: Next) -> Response {
    if req.method() != Method::GET
        && let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<PeerCred>>()
        && !matches!(peer.uid, Some(uid) if uid == 0 || uid == state.allowed_uid)
    {
        return ApiError::forbidden("only the edge agent may change modules and identities")
            .into_response();
    }
    next.run(req).await
}

fn runtime_err(e: RuntimeError) -> ApiError {
    let status = match &e {
        RuntimeError::NotFound(_) | RuntimeError::ImageNotFound(_) => StatusCode::NOT_FOUND,
        RuntimeError::AlreadyExists(_) => StatusCode::CONFLICT,
        RuntimeError::InvalidSpec { .. } => StatusCode::BAD_REQUEST,
        RuntimeError::PullFailed { .. } => StatusCode::BAD_GATEWAY,
        RuntimeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        RuntimeError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::AlreadyExists(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
        StoreError::InvalidId(_) => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

fn details(s: ModuleState, kind: &str) -> ModuleDetails {
    let status = match s.status {
        ModuleStatus::Running => "running",
        ModuleStatus::Stopped => "stopped",
        ModuleStatus::Failed => "failed",
        ModuleStatus::Dead => "dead",
        ModuleStatus::Unknown => "unknown",
    };
    let exit_status = match (s.exited_at, s.exit_code) {
        (Some(t), Some(code)) => Some(ExitStatus {
            exit_time: t.to_iso8601(),
            status_code: code.to_string(),
        }),
        _ => None,
    };
    ModuleDetails {
        id: s.runtime_id.clone().unwrap_or_default(),
        name: s.spec.name.clone(),
        kind: kind.to_owned(),
        config: ModuleConfig {
            settings: ModuleSettings {
                image: s.spec.image.clone(),
                create_options: s.spec.create_options.clone(),
            },
            env: s
                .spec
                .env
                .iter()
                .map(|(k, v)| EnvVar {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            auth: None,
        },
        status: ModuleStatusJson {
            start_time: s.started_at.map(Timestamp::to_iso8601),
            exit_status,
            runtime_status: RuntimeStatus {
                status: status.to_owned(),
                description: None,
            },
        },
        labels: s.spec.labels,
    }
}

async fn runtime_kind(state: &MgmtState) -> String {
    state
        .runtime
        .info()
        .await
        .map_or_else(|_| "docker".to_owned(), |i| i.kind)
}

async fn list_modules(State(state): State<MgmtState>) -> Result<Response, ApiError> {
    let kind = runtime_kind(&state).await;
    let mut modules: Vec<ModuleDetails> = state
        .runtime
        .list()
        .await
        .map_err(runtime_err)?
        .into_iter()
        .map(|m| details(m, &kind))
        .collect();
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json_response(StatusCode::OK, &ModuleList { modules }))
}

async fn get_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let kind = runtime_kind(&state).await;
    let m = state.runtime.get(&name).await.map_err(runtime_err)?;
    Ok(json_response(StatusCode::OK, &details(m, &kind)))
}

/// Turns an API spec into a runtime spec: identity (created if missing),
/// workload socket, injected environment.
async fn prepare_spec(state: &MgmtState, spec: &ModuleSpecJson) -> Result<ModuleSpec, ApiError> {
    ModuleId::new(spec.name.as_str()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let identity = state
        .daemon
        .identities
        .get_or_create(&spec.name, "iotedge")
        .await
        .map_err(store_err)?;
    let socket = state
        .sockets
        .ensure(&identity.module_id)
        .await
        .map_err(|e| ApiError::internal(format!("cannot create the workload socket: {e}")))?;
    let user_env: BTreeMap<String, String> = spec
        .config
        .env
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    Ok(ModuleSpec {
        name: spec.name.clone(),
        image: spec.config.settings.image.clone(),
        create_options: spec.config.settings.create_options.clone(),
        env: module_env(&state.env, &identity, &socket, &user_env),
        labels: spec.labels.clone(),
        workload_socket: Some(socket),
        management_socket: None,
    })
}

async fn pull_if_wanted(state: &MgmtState, spec: &ModuleSpecJson) -> Result<(), ApiError> {
    let policy = spec.image_pull_policy.as_deref().unwrap_or("on-create");
    match policy {
        "never" => Ok(()),
        "on-create" => {
            let auth = spec.config.auth.as_ref().map(|a| RegistryAuth {
                address: a.serveraddress.clone(),
                username: a.username.clone(),
                password: a.password.clone(),
            });
            state
                .runtime
                .pull(&spec.config.settings.image, auth.as_ref())
                .await
                .map_err(runtime_err)
        }
        other => Err(ApiError::bad_request(format!(
            "unknown imagePullPolicy {other:?}; expected \"on-create\" or \"never\""
        ))),
    }
}

async fn create_module(State(state): State<MgmtState>, body: Bytes) -> Result<Response, ApiError> {
    let spec: ModuleSpecJson = parse_body(&body)?;
    let rt = prepare_spec(&state, &spec).await?;
    pull_if_wanted(&state, &spec).await?;
    state.runtime.create(&rt).await.map_err(runtime_err)?;
    let kind = runtime_kind(&state).await;
    let m = state.runtime.get(&rt.name).await.map_err(runtime_err)?;
    Ok(json_response(StatusCode::CREATED, &details(m, &kind)))
}

async fn update_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: ModuleSpecJson = parse_body(&body)?;
    if spec.name != name {
        return Err(ApiError::bad_request(format!(
            "the body names module {:?} but the path names {name:?}",
            spec.name
        )));
    }
    let start = q.get("start").is_some_and(|v| v == "true");
    let rt = prepare_spec(&state, &spec).await?;
    match state.runtime.stop(&name, STOP_TIMEOUT).await {
        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
        Err(e) => return Err(runtime_err(e)),
    }
    match state.runtime.remove(&name).await {
        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
        Err(e) => return Err(runtime_err(e)),
    }
    pull_if_wanted(&state, &spec).await?;
    state.runtime.create(&rt).await.map_err(runtime_err)?;
    if start {
        state.runtime.start(&name).await.map_err(runtime_err)?;
    }
    let kind = runtime_kind(&state).await;
    let m = state.runtime.get(&name).await.map_err(runtime_err)?;
    Ok(json_response(StatusCode::OK, &details(m, &kind)))
}

async fn prepare_update(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let spec: ModuleSpecJson = parse_body(&body)?;
    if spec.name != name {
        return Err(ApiError::bad_request(
            "the body and the path name different modules",
        ));
    }
    pull_if_wanted(&state, &spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runtime.remove(&name).await.map_err(runtime_err)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runtime.start(&name).await.map_err(runtime_err)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .runtime
        .stop(&name, STOP_TIMEOUT)
        .await
        .map_err(runtime_err)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_module(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runtime.restart(&name).await.map_err(runtime_err)?;
    Ok(StatusCode::NO_CONTENT)
}

fn parse_bool(q: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") | Some("") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}={other:?} is not true/false"
        ))),
    }
}

fn parse_time(q: &HashMap<String, String>, key: &str) -> Result<Option<Timestamp>, ApiError> {
    let Some(v) = q.get(key).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(secs) = v.parse::<i64>() {
        return Ok(Some(Timestamp::from_millis(secs.saturating_mul(1000))));
    }
    Timestamp::parse(v).map(Some).map_err(|_| {
        ApiError::bad_request(format!("{key}={v:?} is neither unix seconds nor ISO-8601"))
    })
}

/// Parses the logs query (`follow`, `tail=all|N`, `since`, `until`, `timestamps`).
pub fn parse_log_options(q: &HashMap<String, String>) -> Result<LogOptions, ApiError> {
    let tail = match q.get("tail").map(String::as_str) {
        None | Some("all") | Some("") => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("tail={n:?} is neither \"all\" nor a number"))
        })?),
    };
    Ok(LogOptions {
        follow: parse_bool(q, "follow")?,
        tail,
        since: parse_time(q, "since")?,
        until: parse_time(q, "until")?,
        timestamps: parse_bool(q, "timestamps")?,
    })
}

async fn module_logs(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let opts = parse_log_options(&q)?;
    let stream = state
        .runtime
        .logs(&name, &opts)
        .await
        .map_err(runtime_err)?;
    let body =
        Body::from_stream(stream.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

async fn list_identities(State(state): State<MgmtState>) -> Response {
    let identities = state
        .daemon
        .identities
        .list()
        .await
        .into_iter()
        .map(IdentityJson::from)
        .collect();
    json_response(StatusCode::OK, &IdentityList { identities })
}

async fn create_identity(
    State(state): State<MgmtState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateIdentityRequest = parse_body(&body)?;
    let identity = state
        .daemon
        .identities
        .create(
            &req.module_id,
            req.managed_by.as_deref().unwrap_or("iotedge"),
        )
        .await
        .map_err(store_err)?;
    if let Err(e) = state.sockets.ensure(&identity.module_id).await {
        let _ = state.daemon.identities.delete(&identity.module_id).await;
        return Err(ApiError::internal(format!(
            "cannot create the workload socket: {e}"
        )));
    }
    Ok(json_response(StatusCode::OK, &IdentityJson::from(identity)))
}

async fn update_identity(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: UpdateIdentityRequest = if body.iter().all(u8::is_ascii_whitespace) {
        UpdateIdentityRequest::default()
    } else {
        parse_body(&body)?
    };
    let identity = state
        .daemon
        .identities
        .update(
            &name,
            req.generation_id.as_deref(),
            req.managed_by.as_deref(),
        )
        .await
        .map_err(store_err)?;
    state
        .sockets
        .ensure(&identity.module_id)
        .await
        .map_err(|e| ApiError::internal(format!("cannot create the workload socket: {e}")))?;
    Ok(json_response(StatusCode::OK, &IdentityJson::from(identity)))
}

async fn delete_identity(
    State(state): State<MgmtState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = canonical_module_id(&name);
    state
        .daemon
        .identities
        .delete(&id)
        .await
        .map_err(store_err)?;
    state.sockets.remove(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn read_trimmed(path: &str) -> Option<String> {
    tokio::fs::read_to_string(path)
        .await
        .ok()
        .map(|s| s.trim().to_owned())
}

async fn system_info(State(state): State<MgmtState>) -> Result<Response, ApiError> {
    let info = state.runtime.info().await.map_err(runtime_err)?;
    let kernel_version = read_trimmed("/proc/sys/kernel/osrelease")
        .await
        .unwrap_or_default();
    let operating_system = match tokio::fs::read_to_string("/etc/os-release").await {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "linux".to_owned()),
        Err(_) => "linux".to_owned(),
    };
    let total_memory = match tokio::fs::read_to_string("/proc/meminfo").await {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024),
        Err(_) => 0,
    };
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    Ok(json_response(
        StatusCode::OK,
        &SystemInfo {
            os_type: info.os_type,
            architecture: info.architecture,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            provisioning: ProvisioningInfo {
                kind: "manual".to_owned(),
                dynamic_reprovisioning: false,
                always_reprovision_on_startup: false,
            },
            server_version: format!("{} {}", info.kind, info.version),
            kernel_version,
            operating_system,
            cpus,
            total_memory,
            virtualized: "unknown".to_owned(),
        },
    ))
}
