//! The service REST API over HTTPS: IoT Hub's paths and JSON shapes (so the
//! official service SDKs work unmodified), plus a few Verge-specific paths.
//!
//! IoT Hub paths (any `api-version` is accepted):
//!
//! | verb | path |
//! |---|---|
//! | GET | `/devices` (`top`) |
//! | PUT, GET, DELETE | `/devices/{id}` |
//! | GET | `/devices/{id}/modules` |
//! | PUT, GET, DELETE | `/devices/{id}/modules/{mid}` |
//! | GET, PATCH, PUT | `/twins/{id}`, `/twins/{id}/modules/{mid}` |
//! | POST | `/twins/{id}/methods`, `/twins/{id}/modules/{mid}/methods` |
//! | POST | `/devices/{id}/applyConfigurationContent` |
//!
//! Verge-specific (IoT Hub does these over AMQP or Event Hubs):
//!
//! * `POST /verge/devices/{id}/messages/deviceBound?ttlSecs=N` — queue a C2D
//!   message. The body is the payload; `iothub-messageid`,
//!   `iothub-correlationid`, `iothub-ack`, `content-type`,
//!   `content-encoding` headers set system properties and `iothub-app-{name}`
//!   headers set application properties. HTTP lowercases header names, so
//!   properties whose names have capitals travel in one
//!   `verge-app-properties` header instead: `name=value` pairs joined by `&`,
//!   each percent-encoded (names keep their case, as in IoT Hub). Answers
//!   `{"messageId": …}`.
//! * `GET /verge/feedback?from=SEQ&max=N` — C2D feedback records (JSON array,
//!   each with `seq`, `originalMessageId`, `statusCode`, `deviceId`, …).
//! * `GET /verge/messages?from=OFFSET&max=N&follow=true` — the D2C log as
//!   NDJSON, one object per message: `offset`, `deviceId`, `moduleId`,
//!   `enqueuedTime`, `messageId`, `correlationId`, `contentType`,
//!   `contentEncoding`, `properties` (object), `body` (base64). With
//!   `follow=true` the stream stays open and new messages follow.
//!
//! For edge hubs (nested-edge shape, see [`scope`]):
//!
//! * `POST /devices/{edge}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope`
//!   — the edge device's children and modules with their keys, authorized by
//!   the edge device's own SAS token (or its `$edgeHub` module's), not by
//!   the shared access policy, and for its own scope only.
//!
//! Blob uploads for edgeAgent's log and support-bundle methods: see [`blob`].
//!
//! For edge devices registering their own modules (see [`device_auth`]):
//! `GET /devices/{d}/modules` and `GET`, `PUT`, `DELETE
//! /devices/{d}/modules/{m}` also accept the device `{d}`'s own SAS token
//! (`sr={host}/devices/{d}`); another device's valid token is a 403.
//!
//! Every other request needs `Authorization: SharedAccessSignature …` signed with
//! the shared access policy's key (see [`auth`]); errors are IoT Hub-shaped:
//! `{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": ""}`.

pub mod auth;
pub mod blob;
pub mod certificates;
pub mod device_auth;
pub mod scope;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use verge_core::{ClientId, DeviceId, Message, ModuleId};

use crate::error::CloudError;
use crate::registry::{DeviceSpec, ModuleSpec};
use crate::{CloudState, D2cEntry};
pub use auth::ServiceAuth;

/// Default `responseTimeoutInSeconds` of a direct method (IoT Hub's).
pub const DEFAULT_METHOD_TIMEOUT_SECS: u64 = 30;
/// IoT Hub's bounds for `responseTimeoutInSeconds`.
pub const METHOD_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 5..=300;
/// D2C entries per NDJSON chunk.
const D2C_CHUNK: usize = 256;

/// What every handler gets.
#[derive(Clone)]
pub struct ApiState {
    /// The core.
    pub cloud: CloudState,
    /// Service credentials.
    pub auth: Arc<ServiceAuth>,
}

/// An error in IoT Hub's response shape.
pub struct ApiError(pub CloudError);

impl From<CloudError> for ApiError {
    fn from(e: CloudError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = self.0.code();
        let body = json!({
            "Message": format!("ErrorCode:{code};{}", self.0),
            "ExceptionMessage": "",
        });
        let mut r = (status, axum::Json(body)).into_response();
        r.headers_mut()
            .insert("iothub-errorcode", HeaderValue::from_static(code));
        r
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

fn bad(m: impl Into<String>) -> ApiError {
    ApiError(CloudError::BadRequest(m.into()))
}

/// The router (without TLS), for tests and for [`serve`].
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/devices", get(list_devices))
        .route(
            "/devices/{id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        .route("/devices/{id}/modules", get(list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(get_module).put(put_module).delete(delete_module),
        )
        .route(
            "/devices/{id}/applyConfigurationContent",
            post(apply_configuration),
        )
        .route(
            "/twins/{id}",
            get(get_device_twin)
                .patch(patch_device_twin)
                .put(put_device_twin),
        )
        .route(
            "/twins/{id}/modules/{mid}",
            get(get_module_twin)
                .patch(patch_module_twin)
                .put(put_module_twin),
        )
        .route("/twins/{id}/methods", post(device_method))
        .route("/twins/{id}/modules/{mid}/methods", post(module_method))
        .route("/verge/devices/{id}/messages/deviceBound", post(c2d_send))
        .route("/verge/feedback", get(feedback))
        .route("/verge/messages", get(d2c_messages))
        .route("/certificates", get(certificates::list))
        .route(
            "/certificates/{name}",
            get(certificates::get)
                .put(certificates::put)
                .delete(certificates::delete),
        )
        .route(
            "/certificates/{name}/generateVerificationCode",
            post(certificates::generate_code),
        )
        .route("/certificates/{name}/verify", post(certificates::verify))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Added after the policy check's layer, so outside it: the edge
        // device authenticates itself (see `scope`).
        .route(
            "/devices/{id}/modules/{mid}/devicesAndModulesInTargetDeviceScope",
            post(scope::devices_and_modules_in_scope),
        )
        // Outside the policy check too: uploads carry a blob SAS (see `blob`).
        .merge(blob::routes())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError(CloudError::NotFound("no such resource".into()))
}

async fn authorize(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let chain = req
        .extensions()
        .get::<device_auth::PeerCertificates>()
        .cloned();
    let why = match st.auth.verify(token) {
        Ok(()) => return next.run(req).await,
        Err(why) => why,
    };
    // The edge device on its own module registry: same handlers, by its
    // SAS token or, with none, its client certificate.
    let device = device_auth::module_registry_target(req.method(), req.uri().path());
    let verdict = match (&device, token, &chain) {
        (Some(d), Some(token), _) => device_auth::verify_device(&st.cloud, d, token),
        (Some(d), None, Some(chain)) => device_auth::verify_device_cert(&st.cloud, d, chain),
        _ => {
            tracing::info!(path = %req.uri().path(), %why, "service request refused");
            return ApiError(CloudError::Unauthorized(why)).into_response();
        }
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(device_auth::DeviceAuthError::Forbidden(why)) => scope::forbidden(why),
        Err(device_auth::DeviceAuthError::Unauthorized(e)) => {
            tracing::info!(path = %req.uri().path(), device = ?device, error = %e,
                "module registry request not authenticated");
            ApiError(e).into_response()
        }
    }
}

/// Value of a query parameter, percent-decoded (`+` is a space).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        (dec(k) == name).then(|| dec(v))
    })
}

fn query_u64(q: Option<&str>, name: &str) -> ApiResult<Option<u64>> {
    query_param(q, name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                bad(format!(
                    "query parameter {name}={v:?} is not a whole number"
                ))
            })
        })
        .transpose()
}

fn if_match(h: &HeaderMap) -> Option<String> {
    h.get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn json_body(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))
}

fn ok_json(v: Value, etag: Option<String>) -> Response {
    let mut r = (StatusCode::OK, axum::Json(v)).into_response();
    if let Some(e) = etag
        && let Ok(h) = HeaderValue::from_str(&format!("\"{e}\""))
    {
        r.headers_mut().insert(header::ETAG, h);
    }
    r
}

fn client(id: &str, mid: Option<&str>) -> ApiResult<ClientId> {
    let d = DeviceId::new(id).map_err(|e| bad(e.to_string()))?;
    Ok(match mid {
        None => ClientId::device(d),
        Some(m) => ClientId::module(d, ModuleId::new(m).map_err(|e| bad(e.to_string()))?),
    })
}

// ------------------------------------------------------------------ devices

async fn list_devices(State(st): State<ApiState>, RawQuery(q): RawQuery) -> ApiResult {
    let top = query_u64(q.as_deref(), "top")?.map(|t| usize::try_from(t).unwrap_or(usize::MAX));
    let list: Vec<Value> = st
        .cloud
        .list_devices(top)
        .iter()
        .map(|d| d.to_json())
        .collect();
    Ok(ok_json(Value::Array(list), None))
}

async fn get_device(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let d = st.cloud.get_device(&id)?;
    Ok(ok_json(d.to_json(), Some(d.record.etag())))
}

async fn put_device(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let spec = DeviceSpec::from_json(&id, &json_body(&body)?)?;
    let (d, created) = st.cloud.put_device(&id, spec, if_match(&headers)).await?;
    tracing::info!(device = %id, created, edge = d.record.iot_edge, "device written");
    Ok(ok_json(d.to_json(), Some(d.record.etag())))
}

async fn delete_device(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    st.cloud.delete_device(&id, if_match(&headers)).await?;
    tracing::info!(device = %id, "device deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ------------------------------------------------------------------ modules

async fn list_modules(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let list: Vec<Value> = st
        .cloud
        .list_modules(&id)?
        .iter()
        .map(|m| m.to_json())
        .collect();
    Ok(ok_json(Value::Array(list), None))
}

async fn get_module(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    let m = st.cloud.get_module(&id, &mid)?;
    Ok(ok_json(m.to_json(), Some(m.record.etag())))
}

async fn put_module(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let spec = ModuleSpec::from_json(&id, &mid, &json_body(&body)?)?;
    let (m, created) = st
        .cloud
        .put_module(&id, &mid, spec, if_match(&headers))
        .await?;
    tracing::info!(device = %id, module = %mid, created, "module written");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut r = ok_json(m.to_json(), Some(m.record.etag()));
    *r.status_mut() = status;
    Ok(r)
}

async fn delete_module(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    st.cloud
        .delete_module(&id, &mid, if_match(&headers))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn apply_configuration(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    st.cloud.apply_configuration(&id, json_body(&body)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// -------------------------------------------------------------------- twins

async fn twin_get(st: &ApiState, c: &ClientId) -> ApiResult {
    let t = st.cloud.get_twin(c)?;
    Ok(ok_json(t.to_json(), Some(t.twin.etag())))
}

async fn twin_write(
    st: &ApiState,
    c: &ClientId,
    headers: &HeaderMap,
    body: &Bytes,
    replace: bool,
) -> ApiResult {
    let body = json_body(body)?;
    let t = if replace {
        st.cloud.replace_twin(c, body, if_match(headers)).await?
    } else {
        st.cloud.update_twin(c, body, if_match(headers)).await?
    };
    Ok(ok_json(t.to_json(), Some(t.twin.etag())))
}

async fn get_device_twin(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    twin_get(&st, &client(&id, None)?).await
}

async fn patch_device_twin(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    twin_write(&st, &client(&id, None)?, &headers, &body, false).await
}

async fn put_device_twin(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    twin_write(&st, &client(&id, None)?, &headers, &body, true).await
}

async fn get_module_twin(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    twin_get(&st, &client(&id, Some(&mid))?).await
}

async fn patch_module_twin(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    twin_write(&st, &client(&id, Some(&mid))?, &headers, &body, false).await
}

async fn put_module_twin(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    twin_write(&st, &client(&id, Some(&mid))?, &headers, &body, true).await
}

// ------------------------------------------------------------------ methods

async fn invoke(st: &ApiState, c: &ClientId, body: &Bytes) -> ApiResult {
    let body = json_body(body)?;
    let name = body
        .get("methodName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("methodName is required"))?;
    let secs = |field: &str, default: u64| -> ApiResult<u64> {
        match body.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad(format!("{field} must be a whole number of seconds"))),
        }
    };
    let response = secs("responseTimeoutInSeconds", DEFAULT_METHOD_TIMEOUT_SECS)?;
    if !METHOD_TIMEOUT_RANGE.contains(&response) {
        return Err(bad(format!(
            "responseTimeoutInSeconds must be within {}..={}, got {response}",
            METHOD_TIMEOUT_RANGE.start(),
            METHOD_TIMEOUT_RANGE.end()
        )));
    }
    let connect = secs("connectTimeoutInSeconds", 0)?;
    if connect > *METHOD_TIMEOUT_RANGE.end() {
        return Err(bad(format!(
            "connectTimeoutInSeconds must be at most {}, got {connect}",
            METHOD_TIMEOUT_RANGE.end()
        )));
    }
    let payload = body.get("payload").cloned().unwrap_or(Value::Null);
    let r = st
        .cloud
        .invoke_method(
            c,
            name,
            payload,
            Duration::from_secs(response),
            Duration::from_secs(connect),
        )
        .await?;
    Ok(ok_json(
        json!({ "status": r.status, "payload": r.payload }),
        None,
    ))
}

async fn device_method(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    invoke(&st, &client(&id, None)?, &body).await
}

async fn module_method(
    State(st): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    invoke(&st, &client(&id, Some(&mid))?, &body).await
}

// ---------------------------------------------------------------------- C2D

/// The header carrying application properties with their case (see the
/// module docs): HTTP header names are case-insensitive and arrive lowercased.
pub const APP_PROPERTIES: &str = "verge-app-properties";

async fn c2d_send(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let ttl = query_u64(q.as_deref(), "ttlSecs")?.unwrap_or(0);
    let mut msg = Message::new(body);
    for (name, value) in &headers {
        let Ok(v) = value.to_str() else { continue };
        let n = name.as_str();
        let s = &mut msg.system;
        match n {
            "iothub-messageid" => s.message_id = Some(v.to_owned()),
            "iothub-correlationid" => s.correlation_id = Some(v.to_owned()),
            "iothub-ack" => s.ack = Some(v.to_owned()),
            "iothub-userid" => s.user_id = Some(v.to_owned()),
            "content-type" => s.content_type = Some(v.to_owned()),
            "content-encoding" => s.content_encoding = Some(v.to_owned()),
            APP_PROPERTIES => {
                for pair in v.split('&').filter(|p| !p.is_empty()) {
                    let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
                    let dec = |x: &str| {
                        percent_encoding::percent_decode_str(x)
                            .decode_utf8()
                            .map(std::borrow::Cow::into_owned)
                    };
                    match (dec(k), dec(val)) {
                        (Ok(k), Ok(val)) if !k.is_empty() => msg.properties.insert(&k, &val),
                        _ => {
                            return Err(ApiError(CloudError::BadRequest(format!(
                                "{APP_PROPERTIES}: {pair:?} is not a percent-encoded UTF-8 name=value pair"
                            ))));
                        }
                    }
                }
            }
            _ => {
                if let Some(app) = n.strip_prefix("iothub-app-") {
                    msg.properties.insert(app, v);
                }
            }
        }
    }
    let id = st.cloud.c2d_send(&id, msg, ttl).await?;
    Ok(ok_json(json!({ "messageId": id }), None))
}

async fn feedback(State(st): State<ApiState>, RawQuery(q): RawQuery) -> ApiResult {
    let from = query_u64(q.as_deref(), "from")?.unwrap_or(0);
    let max = query_u64(q.as_deref(), "max")?.unwrap_or(1000).min(10_000) as usize;
    let list: Vec<Value> = st
        .cloud
        .c2d_feedback(from, max)?
        .into_iter()
        .map(|f| {
            let mut v = serde_json::to_value(&f).unwrap_or(Value::Null);
            if let Value::Object(o) = &mut v {
                o.insert("seq".into(), json!(f.seq));
            }
            v
        })
        .collect();
    Ok(ok_json(Value::Array(list), None))
}

// ---------------------------------------------------------------------- D2C

/// One D2C entry as an NDJSON line.
pub fn d2c_json(e: &D2cEntry) -> Value {
    let s = &e.message.system;
    let props: serde_json::Map<String, Value> = e
        .message
        .properties
        .iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    json!({
        "offset": e.offset,
        "deviceId": s.connection_device_id,
        "moduleId": s.connection_module_id,
        "enqueuedTime": s.enqueued_time.map(|t| t.to_iso8601()),
        "messageId": s.message_id,
        "correlationId": s.correlation_id,
        "contentType": s.content_type,
        "contentEncoding": s.content_encoding,
        "properties": props,
        "body": base64::engine::general_purpose::STANDARD.encode(&e.message.body),
    })
}

async fn d2c_messages(State(st): State<ApiState>, RawQuery(q): RawQuery) -> ApiResult {
    let from = query_u64(q.as_deref(), "from")?.unwrap_or(0);
    let limit = query_u64(q.as_deref(), "max")?.unwrap_or(u64::MAX);
    let follow = match query_param(q.as_deref(), "follow").as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => return Err(bad(format!("follow={other:?} must be true or false"))),
    };
    let cloud = st.cloud.clone();
    let stream = futures_util::stream::unfold(
        (cloud, from, limit),
        move |(cloud, next, left)| async move {
            if left == 0 {
                return None;
            }
            loop {
                let max = usize::try_from(left.min(D2C_CHUNK as u64)).unwrap_or(D2C_CHUNK);
                match cloud.read_d2c(next, max) {
                    Ok(entries) if !entries.is_empty() => {
                        let mut buf = Vec::new();
                        let mut last = next;
                        for e in &entries {
                            // Serializing a Value cannot fail.
                            if serde_json::to_writer(&mut buf, &d2c_json(e)).is_ok() {
                                buf.push(b'\n');
                            }
                            last = e.offset;
                        }
                        let n = entries.len() as u64;
                        return Some((
                            Ok::<_, Infallible>(Bytes::from(buf)),
                            (cloud, last + 1, left - n.min(left)),
                        ));
                    }
                    Ok(_) if follow => {
                        if cloud.wait_d2c(next).await.is_err() {
                            return None;
                        }
                    }
                    Ok(_) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "d2c read failed");
                        return None;
                    }
                }
            }
        },
    );
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

// -------------------------------------------------------------------- serve

/// The service API listener's caps: a third of what `RLIMIT_NOFILE` leaves
/// (the device port gets the rest, [`crate::device::listen_limits`]), half
/// of it per peer address, 10 s for the TLS handshake.
pub fn listen_limits() -> verge_listen::Limits {
    let shares = verge_listen::fds::share(verge_listen::fds::fd_limit(), 256, &[2, 1]);
    verge_listen::Limits::new(shares.get(1).copied().unwrap_or(1), Duration::from_secs(10))
}

/// Serves the API over TLS on `listener` until `shutdown` resolves; then
/// stops accepting and drops open connections (follow streams included).
/// Caps from [`listen_limits`], default HTTP deadlines (30 s for a request
/// head or an idle gap, 30 s of a stalled body, 60 s of a stalled write).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: ApiState,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(
        listener,
        tls,
        state,
        shutdown,
        listen_limits(),
        verge_listen::http::Timeouts::default(),
    )
    .await;
}

/// [`serve`] with explicit caps and deadlines.
pub async fn serve_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: ApiState,
    shutdown: impl Future<Output = ()>,
    limits: verge_listen::Limits,
    timeouts: verge_listen::http::Timeouts,
) {
    serve_app(listener, tls, router(state), shutdown, limits, timeouts).await;
}

/// [`serve_with`] for any router: the service API merged with more routes
/// (the device WebSocket, [`crate::ws::router`], shares this listener as it
/// shares IoT Hub's port 443; DPS over HTTPS, [`crate::dps::http`]).
pub async fn serve_app(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    limits: verge_listen::Limits,
    timeouts: verge_listen::http::Timeouts,
) {
    let acceptor = TlsAcceptor::from(tls);
    verge_listen::Listener::new(
        "service-api",
        listener,
        limits,
        verge_listen::CancellationToken::new(),
    )
    .run_until(
        move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            async move {
                let tls = match conn.handshake(acceptor.accept(tcp)).await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        tracing::debug!(peer = %conn.peer(), error = %e, "TLS handshake failed");
                        return;
                    }
                    None => return,
                };
                // A client certificate reaches the handlers (an X.509 edge
                // device on its module registry, see `device_auth`).
                let chain = verge_x509::client_chain(tls.get_ref().1);
                let app = match chain {
                    c if !c.is_empty() => {
                        app.layer(axum::Extension(device_auth::PeerCertificates(Arc::new(c))))
                    }
                    _ => app,
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                verge_listen::http::serve(tls, svc, (), timeouts, &conn).await;
            }
        },
        shutdown,
    )
    .await;
}
