//! Direct methods: the HTTPS API modules call (`POST /twins/{d}[/modules/{m}]/methods`),
//! delivered to the target over its MQTT connection as
//! `$iothub/methods/POST/{name}/?$rid=…` and answered with the callee's
//! `$iothub/methods/res/{status}/?$rid=…`. The same relay ([`relay`])
//! carries calls from the cloud that arrive on the target's upstream link.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use verge_core::ClientId;
use verge_core::method::{MAX_METHOD_PAYLOAD, check_method_name};

use crate::HubState;
use crate::session::Outbound;

/// The HTTP routes.
pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/twins/{device}/methods", post(invoke_device))
        .route(
            "/twins/{device}/modules/{module}/methods",
            post(invoke_module),
        )
        .route("/edgehub/desired", put(put_edgehub_desired))
        .route(crate::ws::PATH, get(crate::ws::upgrade))
        // uamqp's fixed WebSocket path (edgeHub ignores the path).
        .route(crate::ws::SERVICEBUS_PATH, get(crate::ws::upgrade))
        .route("/$servicebus/websocket/", get(crate::ws::upgrade))
        .with_state(state)
}

/// The TCP peer of an HTTPS connection (added per connection by the
/// listener; used in logs).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// `PUT /edgehub/desired`: replaces the `$edgeHub` desired properties (the
/// hub's configuration, routes included) live, as a deployment would. Only the
/// edge device identity itself may do this: the `Authorization` header must be
/// a SAS token for `{hub}/devices/{device}` signed with the device key (module
/// and leaf-device tokens get 401). 200 `{"routes": n}` when applied; 400 with
/// the reason when the document or any route is invalid, and the previous
/// routes stay active.
async fn put_edgehub_desired(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "missing Authorization header");
    };
    let Ok(device) = verge_core::DeviceId::new(state.cfg.device_id.as_str()) else {
        // Config::validate checked the id at load time.
        return error(StatusCode::INTERNAL_SERVER_ERROR, "bad device id");
    };
    if let Err(e) = state.sas.verify_token(&ClientId::device(device), token) {
        tracing::warn!(reason = %e, "$edgeHub desired update refused");
        return error(StatusCode::UNAUTHORIZED, "not authorized");
    }
    let applied = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => state.set_edgehub_desired(&v).await,
        Err(e) => Err(crate::ConfigUpdateError::Json(e.to_string())),
    };
    match applied {
        Ok(n) => {
            tracing::info!(routes = n, "new $edgeHub desired properties applied (HTTP)");
            (StatusCode::OK, axum::Json(json!({ "routes": n }))).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "$edgeHub desired properties refused; previous routes stay active");
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "message": message.into() }))).into_response()
}

async fn invoke_device(
    State(state): State<Arc<HubState>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    invoke(&state, device, &headers, &body).await
}

async fn invoke_module(
    State(state): State<Arc<HubState>>,
    Path((device, module)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    invoke(&state, format!("{device}/{module}"), &headers, &body).await
}

async fn invoke(state: &HubState, target: String, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(caller) = headers
        .get("x-ms-edge-moduleId")
        .and_then(|v| v.to_str().ok())
    else {
        return error(StatusCode::BAD_REQUEST, "missing x-ms-edge-moduleId header");
    };
    // edgeHub answers every authentication failure, a missing token
    // included, with 401.
    let Some(token) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "missing Authorization header");
    };
    let caller_id = match ClientId::parse(caller) {
        Ok(c) if c.is_module() && c.device.as_str() == state.cfg.device_id => c,
        _ => {
            return error(
                StatusCode::UNAUTHORIZED,
                "caller must be a module of this edge device",
            );
        }
    };
    if let Err(e) = state.sas.verify_token(&caller_id, token) {
        tracing::warn!(caller, reason = %e, "method call refused");
        return error(StatusCode::UNAUTHORIZED, "not authorized");
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
    };
    let Some(name) = req.get("methodName").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "methodName is required");
    };
    // Checked again by `relay`; here first so an oversized payload is not
    // serialized for nothing.
    if let Err(e) = check_method_name(name) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let timeout = req
        .get("responseTimeoutInSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30)
        .clamp(1, 300);
    let payload = req.get("payload").cloned().unwrap_or(Value::Null);
    // Serializing a Value cannot fail.
    let payload = Bytes::from(serde_json::to_vec(&payload).unwrap_or_default());
    state.metrics.direct_method(caller, &target);
    match relay(state, &target, name, payload, Duration::from_secs(timeout)).await {
        Ok((status, payload)) => {
            let payload: Value = if payload.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into()))
            };
            (
                StatusCode::OK,
                axum::Json(json!({ "status": status, "payload": payload })),
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::NOT_FOUND),
            e.to_string(),
        ),
    }
}

/// Why a relayed method call got no answer from its target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The method name is not one IoT Hub accepts
    /// ([`verge_core::method::check_method_name`]).
    #[error("{0}")]
    BadName(String),
    /// The request payload is over [`MAX_METHOD_PAYLOAD`].
    #[error("method payload is {0} bytes; the limit is {MAX_METHOD_PAYLOAD}")]
    PayloadTooLarge(usize),
    /// The target is not connected or not subscribed to methods.
    #[error("{0} is not connected or not listening for methods")]
    NotListening(String),
    /// The target's connection ended before it answered.
    #[error("{0} disconnected")]
    Disconnected(String),
    /// No answer in time.
    #[error("{0} did not answer within {1} s")]
    Timeout(String, u64),
}

impl RelayError {
    /// The status IoT Hub answers with: 400 bad name, 413 payload too
    /// large, 404 offline, 504 timeout.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadName(_) => 400,
            Self::PayloadTooLarge(_) => 413,
            Self::NotListening(_) | Self::Disconnected(_) => 404,
            Self::Timeout(..) => 504,
        }
    }
}

/// Delivers method `name` to `target` (`d` or `d/m`) over its MQTT
/// connection and waits up to `timeout` for its answer (status, payload).
/// Used by the HTTP API (module-to-module calls) and by the upstream link
/// (calls from the cloud), so both refuse the same bad names and payloads
/// before anything reaches the target's connection.
pub async fn relay(
    state: &HubState,
    target: &str,
    name: &str,
    payload: Bytes,
    timeout: Duration,
) -> Result<(i64, Bytes), RelayError> {
    check_method_name(name).map_err(|e| RelayError::BadName(e.to_string()))?;
    if payload.len() > MAX_METHOD_PAYLOAD {
        return Err(RelayError::PayloadTooLarge(payload.len()));
    }
    let rid = format!("{:x}", state.next_id());
    let topic = format!("$iothub/methods/POST/{name}/?$rid={rid}");
    let Some(conn) = state.sessions.deliverable(target, &topic) else {
        return Err(RelayError::NotListening(target.to_owned()));
    };
    let (tx, rx) = oneshot::channel();
    state.register_method(target, &rid, tx);
    let out = Outbound {
        topic,
        payload,
        ack: None,
    };
    let result = tokio::time::timeout(timeout, async {
        conn.tx.send(out).await.ok()?;
        rx.await.ok()
    })
    .await;
    state.forget_method(target, &rid);
    match result {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err(RelayError::Disconnected(target.to_owned())),
        Err(_) => Err(RelayError::Timeout(target.to_owned(), timeout.as_secs())),
    }
}
