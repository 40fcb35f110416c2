//! The workload API, one Unix socket per module.
//!
//! Caller isolation is by socket: every module identity gets its own socket
//! `<workload_dir>/<module>.sock` (runtime name, without `$`), created when
//! the identity is created (or found at startup) and removed with it. The
//! runtime gives a module only its own socket (Docker: bind-mounted at the
//! `[connect] workload_uri` path; process: `IOTEDGE_WORKLOADURI` points at it).
//! The socket knows which module it belongs to, so a request on module A's
//! socket that names module B, or a generation id other than A's current
//! one, is answered 403.
//!
//! # Who may use a socket: the caller's process
//!
//! Docker backend: a module's socket is bind-mounted into its container
//! only, so the socket alone names the caller.
//!
//! Process backend: all modules run as one Unix user and the socket files
//! are mode 0666, so any process could open any module's socket. There a
//! [`CallerCheck`] runs before every request that acts as the module (sign,
//! encrypt, decrypt, certificates, the hub's identities): it takes the
//! caller's pid from `SO_PEERCRED` and serves it only if the module's
//! current process (its pid from the runtime, or the agent watchdog's pid for
//! a process agent) is the caller or one of its ancestors (walking
//! `/proc/<pid>/stat` parent links, at most [`MAX_ANCESTRY`] steps), or if
//! the caller is verged itself. Anything else gets 403 and a log line with
//! the pid. The module's pid is looked up per request (never cached), so a
//! restarted module is recognised at once and its old pid stops counting.
//! The process group is deliberately not trusted: modules share verged's
//! session, and `setpgid` lets any process of a session join another
//! process group in it. A module's process that leaves the module's tree
//! (double fork, re-parented to init) loses access. The trust bundles are
//! public and served to every caller.
//!
//! # Verge extension: the hub's identity source
//!
//! `GET /modules/$edgeHub/identities?api-version=…` (also `edgeHub`, the
//! runtime name) answers `200 [{"moduleId","generationId","key"}]`: every
//! module identity of this device with its SAS key (base64). The hub needs
//! the keys to check module SAS tokens itself, also while verged is down
//! (aziot's edgeHub gets the same keys from the cloud's device scope). It is
//! served on the `$edgeHub` socket only; any other socket gets 403, also
//! when it names itself. Why this is safe:
//!
//! * only the hub's socket answers, and socket = caller identity (see above);
//! * the hub is the party that verifies module tokens, so it must hold the
//!   keys anyway; it gets module keys only, never the device key, so it
//!   cannot derive keys of identities created later or act as the device;
//! * nothing is logged: neither the handler nor the HTTP layer logs bodies,
//!   and the response type's `Debug` leaves the key out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verge_core::id::{DeviceId, HubHostname};
use verge_runtime::{ModuleRuntime, ModuleStatus};

use crate::api::{
    CertificateResponse, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse,
    HubModuleIdentity, IdentityCertificateRequest, PrivateKey, ServerCertificateRequest,
    SignRequest, SignResponse, TrustBundleResponse,
};
use crate::ca::{CaError, EdgeCa, IssuedCert, IssuedKind};
use crate::http::{
    ApiError, PeerCred, ServedSocket, SocketLimits, bind_unix, json_response, parse_body,
    require_api_version,
};
use crate::keys::{IdentityStore, ModuleIdentity, canonical_module_id, runtime_name};
use crate::supervision::AgentMonitor;

/// What the APIs share.
#[derive(Debug, Clone)]
pub struct DaemonState {
    /// This device.
    pub device_id: DeviceId,
    /// Its hub.
    pub hub: HubHostname,
    /// This device's hostname.
    pub hostname: String,
    /// Module identities (and the device key).
    pub identities: IdentityStore,
    /// The edge CA.
    pub ca: EdgeCa,
}

#[derive(Clone)]
struct ModuleCtx {
    state: Arc<DaemonState>,
    /// The identity id this socket belongs to.
    module_id: String,
}

/// The workload router for the socket of `module_id`, serving any caller
/// that can open the socket (Docker backend, tests).
pub fn router(state: Arc<DaemonState>, module_id: &str) -> Router {
    router_checked(state, module_id, None)
}

/// The workload router for the socket of `module_id`; with `check`, only the
/// module's own processes may act as it (see the module docs).
pub fn router_checked(
    state: Arc<DaemonState>,
    module_id: &str,
    check: Option<Arc<CallerCheck>>,
) -> Router {
    let module_id = canonical_module_id(module_id);
    let ctx = ModuleCtx {
        state,
        module_id: module_id.clone(),
    };
    let acting = Router::new()
        .route("/modules/{name}/genid/{genid}/sign", post(sign))
        .route("/modules/{name}/genid/{genid}/encrypt", post(encrypt))
        .route("/modules/{name}/genid/{genid}/decrypt", post(decrypt))
        .route("/modules/{name}/certificate/identity", post(identity_cert))
        .route("/modules/{name}/identities", get(hub_identities))
        .route(
            "/modules/{name}/genid/{genid}/certificate/server",
            post(server_cert),
        );
    let acting = match check {
        Some(check) => acting.layer(axum::middleware::from_fn_with_state(
            (check, module_id),
            require_module_caller,
        )),
        None => acting,
    };
    Router::new()
        .route("/trust-bundle", get(trust_bundle))
        .route("/manifest-trust-bundle", get(trust_bundle))
        .merge(acting)
        .fallback(|| async { ApiError::not_found("no such workload API path") })
        .layer(axum::middleware::from_fn(require_api_version))
        .with_state(ctx)
}

/// How many parent links the caller check follows before giving up.
pub const MAX_ANCESTRY: usize = 64;

/// Who may act as a module on its socket with the process backend: the
/// module's own process tree (see the module docs).
pub struct CallerCheck {
    runtime: Arc<dyn ModuleRuntime>,
    /// A process agent: its identity id and the watchdog that knows its pid.
    agent: Option<(String, AgentMonitor)>,
    /// verged's own pid (an in-process hub or agent acts through it).
    own_pid: u32,
    /// Where `<pid>/stat` is read (`/proc`; a test may point elsewhere).
    proc_root: PathBuf,
}

impl std::fmt::Debug for CallerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerCheck")
            .field("agent", &self.agent.as_ref().map(|(id, _)| id))
            .field("own_pid", &self.own_pid)
            .finish_non_exhaustive()
    }
}

impl CallerCheck {
    /// Module pids come from `runtime` (the process backend's `runtime_id`).
    pub fn new(runtime: Arc<dyn ModuleRuntime>) -> Self {
        Self {
            runtime,
            agent: None,
            own_pid: std::process::id(),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The agent `name` runs under verged's watchdog, not the runtime: its
    /// pid comes from `monitor`.
    pub fn with_agent(mut self, name: &str, monitor: AgentMonitor) -> Self {
        self.agent = Some((canonical_module_id(name), monitor));
        self
    }

    /// The pid of the module's running process, looked up now.
    async fn module_pid(&self, module_id: &str) -> Result<u32, String> {
        if let Some((agent, monitor)) = &self.agent
            && agent == module_id
        {
            return monitor
                .snapshot()
                .pid
                .ok_or_else(|| format!("the agent {module_id} is not running"));
        }
        let name = runtime_name(module_id);
        let state = self
            .runtime
            .get(name)
            .await
            .map_err(|e| format!("module {name} is not known to the runtime: {e}"))?;
        if state.status != ModuleStatus::Running {
            return Err(format!("module {name} is not running"));
        }
        state
            .runtime_id
            .as_deref()
            .and_then(|id| id.parse::<u32>().ok())
            .ok_or_else(|| format!("the runtime reports no process id for module {name}"))
    }

    /// Ok if `caller` may act as `module_id`; else why not.
    pub async fn check(&self, module_id: &str, caller: Option<u32>) -> Result<(), String> {
        let caller = caller
            .filter(|p| *p > 0)
            .ok_or("the caller's process id is unknown (SO_PEERCRED)")?;
        if caller == self.own_pid {
            return Ok(());
        }
        let module_pid = self.module_pid(module_id).await?;
        let root = self.proc_root.clone();
        let found = tokio::task::spawn_blocking(move || descends_from(&root, caller, module_pid))
            .await
            .map_err(|e| format!("checking the caller failed: {e}"))?;
        if found {
            Ok(())
        } else {
            Err(format!(
                "process {caller} is not part of module {module_id} (pid {module_pid})"
            ))
        }
    }
}

/// Parent pid from the text of `/proc/<pid>/stat` (the command name, field
/// 2, may hold spaces and parentheses: fields count from the last `)`).
pub fn stat_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(") ")?;
    // rest: state ppid pgrp …
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `ancestor` is `pid` or one of its ancestors, reading
/// `<proc_root>/<pid>/stat` up to [`MAX_ANCESTRY`] times. A process that
/// vanished mid-walk counts as no match.
pub fn descends_from(proc_root: &std::path::Path, pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..=MAX_ANCESTRY {
        if p == ancestor {
            return true;
        }
        if p <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(proc_root.join(p.to_string()).join("stat")) else {
            return false;
        };
        match stat_ppid(&stat) {
            Some(parent) if parent != p => p = parent,
            _ => return false,
        }
    }
    false
}

/// Middleware: only the module's own processes act as it (process backend).
async fn require_module_caller(
    State((check, module_id)): State<(Arc<CallerCheck>, String)>,
    req: Request,
    next: Next,
) -> Response {
    let pid = req
        .extensions()
        .get::<ConnectInfo<PeerCred>>()
        .and_then(|c| c.0.pid)
        .and_then(|p| u32::try_from(p).ok());
    match check.check(&module_id, pid).await {
        Ok(()) => next.run(req).await,
        Err(why) => {
            tracing::warn!(module = %module_id, caller_pid = ?pid, reason = %why,
                "workload request refused: the caller is not the module's process");
            ApiError::forbidden(format!(
                "only module {module_id}'s own processes may use its workload socket: {why}"
            ))
            .into_response()
        }
    }
}

impl ModuleCtx {
    /// The caller may only act as the socket's module, with its current generation.
    async fn authorize(&self, name: &str, genid: Option<&str>) -> Result<ModuleIdentity, ApiError> {
        let named = canonical_module_id(name);
        if named != self.module_id {
            return Err(ApiError::forbidden(format!(
                "this workload socket belongs to module {}; it cannot act as {named}",
                self.module_id
            )));
        }
        let identity = self
            .state
            .identities
            .get(&named)
            .await
            .ok_or_else(|| ApiError::not_found(format!("module identity {named} not found")))?;
        if let Some(g) = genid
            && g != identity.generation_id
        {
            return Err(ApiError::forbidden(format!(
                "generation id {g} is not the current generation of module {named}"
            )));
        }
        Ok(identity)
    }
}

/// The hub module's identity id.
pub const HUB_MODULE_ID: &str = "$edgeHub";

/// `GET /modules/$edgeHub/identities`: see the module docs.
async fn hub_identities(
    State(ctx): State<ModuleCtx>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    // The socket must be the named module's, and that module the hub.
    ctx.authorize(&name, None).await?;
    if ctx.module_id != HUB_MODULE_ID {
        return Err(ApiError::forbidden(format!(
            "module identities are served to {HUB_MODULE_ID} only, not to {}",
            ctx.module_id
        )));
    }
    let mut out = Vec::new();
    for identity in ctx.state.identities.list().await {
        let key = ctx
            .state
            .identities
            .module_key(&identity)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        out.push(HubModuleIdentity {
            module_id: identity.module_id,
            generation_id: identity.generation_id,
            key: key.to_base64(),
        });
    }
    Ok(json_response(StatusCode::OK, &out))
}

fn b64(field: &str, v: &str) -> Result<Vec<u8>, ApiError> {
    B64.decode(v.trim())
        .map_err(|e| ApiError::bad_request(format!("{field} is not valid base64: {e}")))
}

async fn trust_bundle(State(ctx): State<ModuleCtx>) -> Response {
    json_response(
        StatusCode::OK,
        &TrustBundleResponse {
            certificate: ctx.state.ca.trust_bundle(),
        },
    )
}

async fn sign(
    State(ctx): State<ModuleCtx>,
    Path((name, genid)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let identity = ctx.authorize(&name, Some(&genid)).await?;
    let req: SignRequest = parse_body(&body)?;
    if let Some(algo) = &req.algo
        && !algo.eq_ignore_ascii_case("HMACSHA256")
    {
        return Err(ApiError::bad_request(format!(
            "unsupported algo {algo:?}; only HMACSHA256"
        )));
    }
    let data = b64("data", &req.data)?;
    let key = ctx
        .state
        .identities
        .module_key(&identity)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &SignResponse {
            digest: key.sign(&data),
        },
    ))
}

async fn encrypt(
    State(ctx): State<ModuleCtx>,
    Path((name, genid)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let identity = ctx.authorize(&name, Some(&genid)).await?;
    let req: EncryptRequest = parse_body(&body)?;
    let plain = b64("plaintext", &req.plaintext)?;
    let iv = b64("initializationVector", &req.initialization_vector)?;
    let out = crate::crypto::encrypt(
        ctx.state.identities.device_key(),
        &identity.module_id,
        &identity.generation_id,
        &plain,
        &iv,
    )
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &EncryptResponse {
            ciphertext: B64.encode(out),
        },
    ))
}

async fn decrypt(
    State(ctx): State<ModuleCtx>,
    Path((name, genid)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let identity = ctx.authorize(&name, Some(&genid)).await?;
    let req: DecryptRequest = parse_body(&body)?;
    let ct = b64("ciphertext", &req.ciphertext)?;
    let iv = b64("initializationVector", &req.initialization_vector)?;
    let out = crate::crypto::decrypt(
        ctx.state.identities.device_key(),
        &identity.module_id,
        &identity.generation_id,
        &ct,
        &iv,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &DecryptResponse {
            plaintext: B64.encode(out),
        },
    ))
}

fn parse_expiration(e: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    e.filter(|s| !s.is_empty())
        .map(|s| {
            OffsetDateTime::parse(s, &Rfc3339).map_err(|err| {
                ApiError::bad_request(format!("expiration {s:?} is not ISO-8601: {err}"))
            })
        })
        .transpose()
}

fn cert_response(c: Result<IssuedCert, CaError>) -> Result<Response, ApiError> {
    let c = c.map_err(|e| match e {
        CaError::BadRequest(m) => ApiError::bad_request(m),
        other => ApiError::internal(other.to_string()),
    })?;
    let expiration = c
        .expiration
        .format(&Rfc3339)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::CREATED,
        &CertificateResponse {
            private_key: PrivateKey {
                kind: "key".to_owned(),
                bytes: c.private_key_pem,
            },
            certificate: c.certificate_pem,
            expiration,
        },
    ))
}

/// Records an issued certificate. A failure is logged, not returned: the
/// certificate is valid either way, and the record only feeds `verge check`.
fn record(ca: &EdgeCa, module: &str, kind: IssuedKind, cn: &str, c: &IssuedCert) {
    if let Err(e) = ca.record_issued(module, kind, cn, c) {
        tracing::warn!(module, kind = kind.as_str(), error = %e, "cannot record the issued certificate");
    }
}

async fn identity_cert(
    State(ctx): State<ModuleCtx>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let identity = ctx.authorize(&name, None).await?;
    let req: IdentityCertificateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IdentityCertificateRequest::default()
    } else {
        parse_body(&body)?
    };
    let exp = parse_expiration(req.expiration.as_deref())?;
    let ca = ctx.state.ca.clone();
    let device = ctx.state.device_id.to_string();
    let r = tokio::task::spawn_blocking(move || {
        let module = &identity.module_id;
        let issued = ca.issue_identity_cert(&device, module, exp);
        if let Ok(c) = &issued {
            record(&ca, module, IssuedKind::Identity, module, c);
        }
        issued
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    cert_response(r)
}

async fn server_cert(
    State(ctx): State<ModuleCtx>,
    Path((name, genid)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let identity = ctx.authorize(&name, Some(&genid)).await?;
    let req: ServerCertificateRequest = parse_body(&body)?;
    let exp = parse_expiration(req.expiration.as_deref())?;
    let ca = ctx.state.ca.clone();
    let r = tokio::task::spawn_blocking(move || {
        let cn = req.common_name.trim();
        let issued = ca.issue_server_cert(cn, exp);
        if let Ok(c) = &issued {
            record(&ca, &identity.module_id, IssuedKind::Server, cn, c);
        }
        issued
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    cert_response(r)
}

/// The per-module workload sockets.
#[derive(Debug)]
pub struct WorkloadSockets {
    state: Arc<DaemonState>,
    dir: PathBuf,
    served: tokio::sync::Mutex<HashMap<String, ServedSocket>>,
    /// Each socket's own cap and deadlines: one module's idle or stalled
    /// connections never take another socket's descriptors.
    limits: SocketLimits,
    /// Process backend: who may act as a module (see the module docs).
    check: Option<Arc<CallerCheck>>,
}

impl WorkloadSockets {
    /// Manages sockets under `dir`.
    pub fn new(state: Arc<DaemonState>, dir: PathBuf) -> Self {
        Self {
            state,
            dir,
            served: tokio::sync::Mutex::new(HashMap::new()),
            limits: SocketLimits::workload(),
            check: None,
        }
    }

    /// Serves, from now on, only the module's own processes (process
    /// backend; see the module docs).
    pub fn with_caller_check(mut self, check: CallerCheck) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    /// Uses `limits` for every socket served from now on.
    pub fn with_limits(mut self, limits: SocketLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The socket path of a module (either name form).
    pub fn socket_path(&self, module: &str) -> PathBuf {
        let id = canonical_module_id(module);
        self.dir.join(format!("{}.sock", runtime_name(&id)))
    }

    /// Starts serving the module's socket unless it is served already.
    pub async fn ensure(&self, module: &str) -> std::io::Result<PathBuf> {
        let id = canonical_module_id(module);
        let mut served = self.served.lock().await;
        let path = self.socket_path(&id);
        if served.contains_key(&id) && path.exists() {
            return Ok(path);
        }
        if let Some(old) = served.remove(&id) {
            // Its file vanished: stop the old server before binding again.
            old.shutdown().await;
        }
        let listener = bind_unix(&path, 0o666)?;
        let router = router_checked(self.state.clone(), &id, self.check.clone());
        tracing::info!(module = %id, socket = %path.display(), "workload socket up");
        served.insert(
            id,
            ServedSocket::serve_with(path.clone(), listener, router, self.limits),
        );
        Ok(path)
    }

    /// Stops the module's socket and removes its file.
    pub async fn remove(&self, module: &str) {
        let id = canonical_module_id(module);
        let s = self.served.lock().await.remove(&id);
        if let Some(s) = s {
            s.shutdown().await;
            tracing::info!(module = %id, "workload socket removed");
        }
    }

    /// Stops all sockets.
    pub async fn shutdown_all(&self) {
        let all: Vec<ServedSocket> = self.served.lock().await.drain().map(|(_, s)| s).collect();
        for s in all {
            s.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(stat_ppid("42 (a) b) (c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(stat_ppid("42 (sh) R 1 42"), Some(1));
        assert_eq!(stat_ppid("42 (sh)"), None);
        assert_eq!(stat_ppid("garbage"), None);
    }

    #[test]
    fn ancestry_follows_parents_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |pid: u32, ppid: u32| {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} (p {pid}) S {ppid} 1 1 0")).unwrap();
        };
        // 30 -> 20 -> 10 -> 1; 40 -> 1; 50 is its own parent (corrupt).
        stat(30, 20);
        stat(20, 10);
        stat(10, 1);
        stat(40, 1);
        stat(50, 50);
        let root = dir.path();
        assert!(descends_from(root, 30, 10));
        assert!(descends_from(root, 30, 30));
        assert!(descends_from(root, 20, 10));
        assert!(
            !descends_from(root, 10, 30),
            "a parent is not its child's descendant"
        );
        assert!(!descends_from(root, 40, 10));
        assert!(!descends_from(root, 50, 10));
        assert!(
            !descends_from(root, 99, 10),
            "a vanished process matches nothing"
        );
        // A chain longer than the bound is refused.
        for p in 100..(100 + MAX_ANCESTRY as u32 + 5) {
            stat(p + 1, p);
        }
        assert!(!descends_from(root, 100 + MAX_ANCESTRY as u32 + 5, 100));
        assert!(descends_from(root, 110, 100));
    }

    #[test]
    fn this_process_descends_from_its_parent_in_real_proc() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(descends_from(std::path::Path::new("/proc"), me, parent));
        assert!(!descends_from(std::path::Path::new("/proc"), parent, me));
    }
}
