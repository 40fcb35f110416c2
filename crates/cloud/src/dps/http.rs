//! DPS over HTTPS, on verge-cloud's service API port.
//!
//! Device side (what aziot-identityd and the C SDK's HTTP transport send):
//!
//! | verb | path | auth |
//! |---|---|---|
//! | PUT | `/{idScope}/registrations/{registrationId}/register` | device SAS (`sr={idScope}/registrations/{id}`) |
//! | GET | `/{idScope}/registrations/{registrationId}/operations/{operationId}` | same |
//!
//! Service side (DPS's service REST API, authorised by verge-cloud's shared
//! access policy, as the rest of the service API):
//!
//! | verb | path |
//! |---|---|
//! | PUT, GET, DELETE | `/enrollments/{registrationId}`, `/enrollmentGroups/{id}` |
//! | GET, POST `…/query` | `/enrollments`, `/enrollmentGroups` (all of them) |
//! | GET, DELETE | `/registrations/{registrationId}` |
//!
//! Errors are DPS-shaped: `{"errorCode": 401002, "message": …}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use serde_json::Value;

use super::{Answer, Dps, RETRY_AFTER_SECS};
use crate::CloudError;
use crate::api::ServiceAuth;
use crate::api::device_auth::PeerCertificates;

/// What the handlers share.
#[derive(Clone)]
pub struct DpsApi {
    /// The service.
    pub dps: Arc<Dps>,
    /// The service API's policy (for enrollment management).
    pub auth: Arc<ServiceAuth>,
}

/// The DPS routes, to merge into the service API's router (they carry
/// their own authentication).
pub fn router(api: DpsApi) -> Router {
    Router::new()
        .route(
            "/{scope}/registrations/{rid}/register",
            put(device_register),
        )
        .route(
            "/{scope}/registrations/{rid}/operations/{op}",
            get(device_poll),
        )
        .route("/enrollments", get(list_individual))
        .route("/enrollments/query", post(list_individual))
        .route(
            "/enrollments/{id}",
            get(get_individual)
                .put(put_individual)
                .delete(delete_individual),
        )
        .route("/enrollmentGroups", get(list_groups))
        .route("/enrollmentGroups/query", post(list_groups))
        .route(
            "/enrollmentGroups/{id}",
            get(get_group).put(put_group).delete(delete_group),
        )
        .route(
            "/registrations/{id}",
            get(get_registration).delete(delete_registration),
        )
        .with_state(api)
}

fn answer(a: Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(a.body)).into_response();
    if a.status == 202 {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from(RETRY_AFTER_SECS));
    }
    r
}

fn error(e: &CloudError) -> Response {
    answer(Answer::error(e))
}

fn json_body(body: &Bytes) -> Result<Value, CloudError> {
    serde_json::from_slice(body)
        .map_err(|e| CloudError::BadRequest(format!("the body is not JSON: {e}")))
}

/// Authenticates a device request: the path's scope must be ours (else
/// 404); a SAS token in `Authorization`, else the client certificate of the
/// connection (X.509 attestation).
fn device_auth(
    dps: &Dps,
    headers: &HeaderMap,
    chain: Option<&PeerCertificates>,
    scope: &str,
    rid: &str,
) -> Result<super::Match, CloudError> {
    if scope != dps.id_scope() {
        return Err(CloudError::NotFound(format!("no ID scope {scope:?}")));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match (token, chain) {
        (Some(token), _) => dps.authenticate(rid, token),
        (None, Some(chain)) => dps.authenticate_cert(rid, &chain.0),
        (None, None) => Err(CloudError::Unauthorized(
            "no Authorization header and no client certificate".into(),
        )),
    }
}

async fn device_register(
    State(api): State<DpsApi>,
    Path((scope, rid)): Path<(String, String)>,
    chain: Option<Extension<PeerCertificates>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let chain = chain.map(|Extension(c)| c);
    let m = match device_auth(&api.dps, &headers, chain.as_ref(), &scope, &rid) {
        Ok(m) => m,
        Err(e) => {
            tracing::info!(registration = %rid, error = %e, "DPS register refused");
            return error(&e);
        }
    };
    match json_body(&body) {
        Ok(v) => answer(api.dps.register(&rid, m, &v).await),
        Err(e) => error(&e),
    }
}

async fn device_poll(
    State(api): State<DpsApi>,
    Path((scope, rid, op)): Path<(String, String, String)>,
    chain: Option<Extension<PeerCertificates>>,
    headers: HeaderMap,
) -> Response {
    let chain = chain.map(|Extension(c)| c);
    match device_auth(&api.dps, &headers, chain.as_ref(), &scope, &rid) {
        Ok(_) => answer(api.dps.poll(&rid, &op)),
        Err(e) => error(&e),
    }
}

fn service_auth(api: &DpsApi, headers: &HeaderMap) -> Result<(), CloudError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    api.auth.verify(token).map_err(CloudError::Unauthorized)
}

fn ok_json(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

async fn list(api: &DpsApi, headers: &HeaderMap, group: bool) -> Response {
    match service_auth(api, headers) {
        Ok(()) => ok_json(Value::Array(api.dps.list_enrollments(group))),
        Err(e) => error(&e),
    }
}

async fn get_one(api: &DpsApi, headers: &HeaderMap, group: bool, id: &str) -> Response {
    match service_auth(api, headers).and_then(|()| api.dps.get_enrollment(group, id)) {
        Ok(v) => ok_json(v),
        Err(e) => error(&e),
    }
}

async fn put_one(
    api: &DpsApi,
    headers: &HeaderMap,
    group: bool,
    id: &str,
    body: &Bytes,
) -> Response {
    let r = async {
        service_auth(api, headers)?;
        let v = json_body(body)?;
        let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
        api.dps.put_enrollment(group, id, &v, if_match).await
    };
    match r.await {
        Ok(v) => ok_json(v),
        Err(e) => error(&e),
    }
}

async fn delete_one(api: &DpsApi, headers: &HeaderMap, group: bool, id: &str) -> Response {
    let r = async {
        service_auth(api, headers)?;
        api.dps.delete_enrollment(group, id).await
    };
    match r.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

async fn list_individual(State(api): State<DpsApi>, headers: HeaderMap) -> Response {
    list(&api, &headers, false).await
}
async fn list_groups(State(api): State<DpsApi>, headers: HeaderMap) -> Response {
    list(&api, &headers, true).await
}
async fn get_individual(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    get_one(&api, &headers, false, &id).await
}
async fn get_group(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    get_one(&api, &headers, true, &id).await
}
async fn put_individual(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_one(&api, &headers, false, &id, &body).await
}
async fn put_group(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_one(&api, &headers, true, &id, &body).await
}
async fn delete_individual(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    delete_one(&api, &headers, false, &id).await
}
async fn delete_group(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    delete_one(&api, &headers, true, &id).await
}

async fn get_registration(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match service_auth(&api, &headers).and_then(|()| api.dps.get_registration(&id)) {
        Ok(v) => ok_json(v),
        Err(e) => error(&e),
    }
}

async fn delete_registration(
    State(api): State<DpsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        service_auth(&api, &headers)?;
        api.dps.delete_registration(&id).await
    };
    match r.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}
