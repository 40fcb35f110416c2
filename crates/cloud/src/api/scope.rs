//! The device-scope API an edge hub uses to authenticate its children
//! offline (reference §11, IoT Hub's nested-edge shape):
//!
//! `POST /devices/{edge}/modules/{$edgeHub}/devicesAndModulesInTargetDeviceScope`
//! with an optional body `{"pageSize": n, "continuationLink": …, "authChain": "edge"}`
//! answers `200 {"devices": [Device…], "modules": [Module…], "continuationLink": null}`:
//! the devices whose parent is `{edge}` and `{edge}`'s own modules, in the
//! service API's `Device`/`Module` shapes (keys included: the hub checks
//! their tokens with them). Everything fits one page.
//!
//! Unlike the rest of the service API it is **not** authorized by the
//! shared access policy: the caller is the edge device itself, with a SAS
//! token of `{edge}` or of its `{edge}/$edgeHub` module identity in
//! `Authorization` (401 otherwise), and it gets its own scope only: a
//! module other than `$edgeHub`, a device that is not an edge device, or an
//! `authChain` whose target is another device is a 403.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::error::CloudError;

/// The module an edge device's hub acts as.
pub const HUB_MODULE: &str = "$edgeHub";

/// A 403 in IoT Hub's shape (`IotHubUnauthorizedAccess`).
pub(crate) fn forbidden(why: String) -> Response {
    tracing::info!(%why, "device-scope request refused");
    let body = json!({
        "Message": format!("ErrorCode:IotHubUnauthorizedAccess;{why}"),
        "ExceptionMessage": "",
    });
    let mut r = (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    r.headers_mut().insert(
        "iothub-errorcode",
        HeaderValue::from_static("IotHubUnauthorizedAccess"),
    );
    r
}

/// `POST /devices/{edge}/modules/{module}/devicesAndModulesInTargetDeviceScope`.
pub async fn devices_and_modules_in_scope(
    State(st): State<ApiState>,
    Path((edge, module)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return ApiError(CloudError::Unauthorized("no Authorization header".into()))
            .into_response();
    };
    if module != HUB_MODULE {
        return forbidden(format!(
            "the device scope is served to {HUB_MODULE}, not to module {module:?}"
        ));
    }
    // The edge device's own token, or its hub module's.
    if let Err(e) = st.cloud.verify_device_token(&edge, token).or_else(|_| {
        st.cloud
            .verify_device_token(&format!("{edge}/{module}"), token)
    }) {
        tracing::info!(device = %edge, error = %e, "device-scope request not authenticated");
        return ApiError(e).into_response();
    }
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return ApiError(CloudError::BadRequest(format!(
                    "the body is not valid JSON: {e}"
                )))
                .into_response();
            }
        }
    };
    if let Some(chain) = request.get("authChain").and_then(Value::as_str) {
        let target = chain.split(';').next().unwrap_or_default();
        if !target.is_empty() && target != edge {
            return forbidden(format!(
                "authChain targets {target:?}; {edge:?} may read its own scope only"
            ));
        }
    }
    match st.cloud.get_device(&edge) {
        Ok(d) if d.record.iot_edge => {}
        Ok(_) => return forbidden(format!("{edge:?} is not an edge device")),
        Err(e) => return ApiError(e).into_response(),
    }
    let (devices, modules) = match st.cloud.device_scope(&edge) {
        Ok(x) => x,
        Err(e) => return ApiError(e).into_response(),
    };
    tracing::info!(device = %edge, children = devices.len(), "device scope served");
    let body = json!({
        "devices": devices.iter().map(crate::DeviceInfo::to_json).collect::<Vec<_>>(),
        "modules": modules.iter().map(crate::ModuleInfo::to_json).collect::<Vec<_>>(),
        "continuationLink": null,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}
