//! The workload API, one Unix socket per module.
//!
//! Caller isolation is by socket: every module identity gets its own socket
//! `<workload_dir>/<module>.sock` (runtime name, without `$`), created when
//! the identity is created (or found at startup) and removed with it. The
//! runtime gives a module only its own socket (Docker: bind-mounted at the
//! `[connect] workload_uri` path; process: `IOTEDGE_WORKLOADURI` points at it).
//! The socket knows which module it belongs to, so a request on module A's
//! socket that names module B, or a generation id other than A's current
//! one, is answered 403. With the process backend all modules share one
//! Unix user, so a misbehaving process could open another module's socket
//! file; the socket mode (0666) does not prevent that — use Docker (or
//! separate users) where modules do not trust each other.
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
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verge_core::id::{DeviceId, HubHostname};

use crate::api::{
    CertificateResponse, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse,
    HubModuleIdentity, IdentityCertificateRequest, PrivateKey, ServerCertificateRequest,
    SignRequest, SignResponse, TrustBundleResponse,
};
use crate::ca::{CaError, EdgeCa, IssuedCert, IssuedKind};
use crate::http::{
    ApiError, ServedSocket, SocketLimits, bind_unix, json_response, parse_body, require_api_version,
};
use crate::keys::{IdentityStore, ModuleIdentity, canonical_module_id, runtime_name};

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

/// The workload router for the socket of `module_id`.
pub fn router(state: Arc<DaemonState>, module_id: &str) -> Router {
    let ctx = ModuleCtx {
        state,
        module_id: canonical_module_id(module_id),
    };
    Router::new()
        .route("/trust-bundle", get(trust_bundle))
        .route("/manifest-trust-bundle", get(trust_bundle))
        .route("/modules/{name}/genid/{genid}/sign", post(sign))
        .route("/modules/{name}/genid/{genid}/encrypt", post(encrypt))
        .route("/modules/{name}/genid/{genid}/decrypt", post(decrypt))
        .route("/modules/{name}/certificate/identity", post(identity_cert))
        .route("/modules/{name}/identities", get(hub_identities))
        .route(
            "/modules/{name}/genid/{genid}/certificate/server",
            post(server_cert),
        )
        .fallback(|| async { ApiError::not_found("no such workload API path") })
        .layer(axum::middleware::from_fn(require_api_version))
        .with_state(ctx)
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
}

impl WorkloadSockets {
    /// Manages sockets under `dir`.
    pub fn new(state: Arc<DaemonState>, dir: PathBuf) -> Self {
        Self {
            state,
            dir,
            served: tokio::sync::Mutex::new(HashMap::new()),
            limits: SocketLimits::workload(),
        }
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
        let router = router(self.state.clone(), &id);
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
