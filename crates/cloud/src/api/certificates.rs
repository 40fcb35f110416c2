//! The certificates resource (see [`crate::certs`] for the shapes and
//! rules): upload, list, get, delete, verification code, proof of
//! possession. Authorized by the shared access policy like the rest of the
//! service API; the store's fsync runs on the blocking pool.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, ApiState, if_match, json_body, ok_json};
use crate::error::CloudError;

/// Runs a blocking store call off the runtime.
async fn blocking<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&crate::certs::CaStore) -> crate::error::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let cloud = st.cloud.clone();
    tokio::task::spawn_blocking(move || f(cloud.ca_certificates()))
        .await
        .map_err(|e| ApiError(CloudError::Storage(format!("certificate task: {e}"))))?
        .map_err(ApiError)
}

/// `GET /certificates`.
pub async fn list(State(st): State<ApiState>) -> ApiResult {
    let value: Vec<Value> = st
        .cloud
        .ca_certificates()
        .list()
        .iter()
        .map(|c| c.to_json(false))
        .collect();
    Ok(ok_json(json!({ "value": value }), None))
}

/// `GET /certificates/{name}`.
pub async fn get(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult {
    let c = st.cloud.ca_certificates().get(&name)?;
    Ok(ok_json(c.to_json(false), None))
}

/// `PUT /certificates/{name}`: 201 created, 200 replaced.
pub async fn put(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let body = json_body(&body)?;
    let hdr = if_match(&headers);
    let n = name.clone();
    let (c, created) = blocking(&st, move |s| s.put(&n, &body, hdr.as_deref())).await?;
    tracing::info!(certificate = %name, created, verified = c.is_verified, "CA certificate uploaded");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(c.to_json(false))).into_response())
}

/// `DELETE /certificates/{name}`.
pub async fn delete(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let hdr = if_match(&headers);
    let n = name.clone();
    blocking(&st, move |s| s.delete(&n, hdr.as_deref())).await?;
    tracing::info!(certificate = %name, "CA certificate deleted");
    Ok(StatusCode::OK.into_response())
}

/// `POST /certificates/{name}/generateVerificationCode`.
pub async fn generate_code(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let hdr = if_match(&headers);
    let c = blocking(&st, move |s| s.generate_code(&name, hdr.as_deref())).await?;
    Ok(ok_json(c.to_json(true), None))
}

/// `POST /certificates/{name}/verify` `{"certificate": PEM}`.
pub async fn verify(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let hdr = if_match(&headers);
    let n = name.clone();
    match blocking(&st, move |s| s.verify(&n, &body, hdr.as_deref())).await {
        Ok(c) => ok_json(c.to_json(false), None),
        Err(e) => {
            tracing::info!(certificate = %name, error = %e.0, "proof of possession refused");
            e.into_response()
        }
    }
}
