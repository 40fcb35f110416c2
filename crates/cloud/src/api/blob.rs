//! A small blob store with Azure Blob Storage's upload shape, so edgeAgent's
//! `UploadModuleLogs`/`UploadSupportBundle` (which take a container SAS URL)
//! work against a self-hosted verge-cloud:
//!
//! | verb | path | auth |
//! |---|---|---|
//! | POST | `/verge/sas/{container}?expirySecs=N` | shared access policy |
//! | PUT | `/verge/blobs/{container}/{blob…}?…&sig=…` (`x-ms-blob-type: BlockBlob`) | the SAS in the query |
//! | GET | `/verge/blobs/{container}` (list) | shared access policy |
//! | GET | `/verge/blobs/{container}/{blob…}` | shared access policy |
//!
//! `POST /verge/sas/…` answers `{"sasUrl": "https://{host}/verge/blobs/{container}?sv=…&sr=c&sp=cw&se=…&sig=…", "expiresOn": …}`
//! for the host the caller reached (its `Host` header): hand that URL to
//! the methods as `sasUrl`; they append the blob name to its path, as with
//! an Azure container SAS URL. The signature is HMAC-SHA256 of
//! `{container}\n{sp}\n{se}` under a key derived from the service policy's
//! key; it lets its holder create blobs in that one container until `se`,
//! nothing else. `PUT` answers 201 like Azure; only block blobs are taken
//! (edgeAgent's JSON logs and bundles are block blobs; Verge's agent
//! uploads text logs as block blobs too). A body is at most
//! [`MAX_BLOB_BYTES`]. Blobs are files under `{data_dir}/blobs/{container}/`,
//! written atomically, with their content type and encoding beside them
//! under `{data_dir}/blobs/.meta/`.

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use verge_core::sas::url_encode;
use verge_core::time::Timestamp;

use super::{ApiError, ApiResult, ApiState, bad, query_param};
use crate::error::CloudError;

/// Largest blob accepted.
pub const MAX_BLOB_BYTES: usize = 64 << 20;
/// Default and largest SAS lifetime.
const DEFAULT_EXPIRY_SECS: u64 = 3600;
const MAX_EXPIRY_SECS: u64 = 7 * 86_400;
/// Most blobs a list returns.
const MAX_LIST: usize = 10_000;
/// Permissions a SAS URL grants: create and write.
const PERMISSIONS: &str = "cw";

/// The blob routes (they authenticate each request themselves: the `PUT`
/// by its SAS, the rest by the service policy).
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/verge/sas/{container}", post(issue_sas))
        .route("/verge/blobs/{container}", get(list))
        .route(
            "/verge/blobs/{container}/{*blob}",
            get(read)
                .put(write)
                .layer(DefaultBodyLimit::max(MAX_BLOB_BYTES)),
        )
}

fn check_container(c: &str) -> ApiResult<()> {
    // Azure's rule: 3-63 lowercase letters, digits and hyphens.
    let ok = (3..=63).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "container name {c:?} must be 3-63 lowercase letters, digits or hyphens"
        )))
    }
}

/// A blob name as a relative path: 1-1024 characters, `/`-separated
/// segments that are neither empty, `.` nor `..` (no way out of the
/// container's directory).
fn blob_path(blob: &str) -> ApiResult<PathBuf> {
    let ok = (1..=1024).contains(&blob.len())
        && !blob.contains(['\0', '\\'])
        && blob
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(blob.split('/').collect())
    } else {
        Err(bad(format!("invalid blob name {blob:?}")))
    }
}

fn root(st: &ApiState) -> PathBuf {
    st.cloud.data_dir().join("blobs")
}

fn string_to_sign(container: &str, sp: &str, se: &str) -> String {
    format!("{container}\n{sp}\n{se}")
}

/// Constant-time comparison (a signature check must not leak the prefix
/// that matched through its timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn policy_auth(st: &ApiState, h: &HeaderMap) -> ApiResult<()> {
    let token = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    st.auth
        .verify(token)
        .map_err(|why| ApiError(CloudError::Unauthorized(why)))
}

async fn issue_sas(
    State(st): State<ApiState>,
    Path(container): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    policy_auth(&st, &headers)?;
    check_container(&container)?;
    let secs = super::query_u64(q.as_deref(), "expirySecs")?.unwrap_or(DEFAULT_EXPIRY_SECS);
    if secs == 0 || secs > MAX_EXPIRY_SECS {
        return Err(bad(format!(
            "expirySecs must be 1-{MAX_EXPIRY_SECS}, not {secs}"
        )));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(st.cloud.hostname())
        .to_owned();
    let se = Timestamp::now().plus_secs(secs).to_iso8601();
    let sig = st
        .auth
        .blob_key()
        .sign(string_to_sign(&container, PERMISSIONS, &se).as_bytes());
    let url = format!(
        "https://{host}/verge/blobs/{container}?sv=2020-04-08&sr=c&sp={PERMISSIONS}&se={}&sig={}",
        url_encode(&se),
        url_encode(&sig)
    );
    Ok((
        StatusCode::OK,
        axum::Json(json!({"sasUrl": url, "expiresOn": se})),
    )
        .into_response())
}

/// Azure-shaped error for the blob `PUT` (the uploader logs the body).
fn blob_error(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut r = (
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ),
    )
        .into_response();
    r.headers_mut()
        .insert("x-ms-error-code", HeaderValue::from_static(code));
    r
}

fn check_sas(st: &ApiState, container: &str, q: Option<&str>) -> Result<(), &'static str> {
    let sp = query_param(q, "sp").ok_or("sp missing")?;
    let se = query_param(q, "se").ok_or("se missing")?;
    let sig = query_param(q, "sig").ok_or("sig missing")?;
    let want = st
        .auth
        .blob_key()
        .sign(string_to_sign(container, &sp, &se).as_bytes());
    if !same(want.as_bytes(), sig.as_bytes()) {
        return Err("signature does not match");
    }
    let expiry = Timestamp::parse(&se).map_err(|_| "se is not a time")?;
    if expiry < Timestamp::now() {
        return Err("the SAS has expired");
    }
    if !sp.contains('c') && !sp.contains('w') {
        return Err("the SAS grants no write");
    }
    Ok(())
}

async fn write(
    State(st): State<ApiState>,
    Path((container, blob)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(why) = check_container(&container).map_err(|_| "bad container") {
        return blob_error(StatusCode::BAD_REQUEST, "InvalidResourceName", why);
    }
    if let Err(why) = check_sas(&st, &container, q.as_deref()) {
        tracing::info!(%container, why, "blob upload refused");
        return blob_error(
            StatusCode::FORBIDDEN,
            "AuthenticationFailed",
            &format!("Server failed to authenticate the request: {why}"),
        );
    }
    let Ok(rel) = blob_path(&blob) else {
        return blob_error(
            StatusCode::BAD_REQUEST,
            "InvalidResourceName",
            "The specified resource name contains invalid characters",
        );
    };
    let kind = headers.get("x-ms-blob-type").and_then(|v| v.to_str().ok());
    if kind != Some("BlockBlob") {
        return blob_error(
            StatusCode::BAD_REQUEST,
            "InvalidHeaderValue",
            "x-ms-blob-type must be BlockBlob",
        );
    }
    let h = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let meta = json!({
        "contentType": h(header::CONTENT_TYPE).unwrap_or_else(|| "application/octet-stream".into()),
        "contentEncoding": h(header::CONTENT_ENCODING),
        "size": body.len(),
        "lastModified": Timestamp::now().to_iso8601(),
    });
    let root = root(&st);
    let data_path = root.join(&container).join(&rel);
    let mut meta_name = rel.into_os_string();
    meta_name.push(".json");
    let meta_path = root.join(".meta").join(&container).join(meta_name);
    let size = body.len();
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for p in [&data_path, &meta_path] {
            if let Some(dir) = p.parent() {
                verge_files::create_private_dir(dir)?;
            }
        }
        verge_files::write_atomic(&data_path, &body)?;
        verge_files::write_atomic(&meta_path, meta.to_string().as_bytes())
    })
    .await;
    match res {
        Ok(Ok(())) => {
            tracing::info!(%container, %blob, size, "blob written");
            let mut r = StatusCode::CREATED.into_response();
            let etag = format!("\"0x{:X}\"", Timestamp::now().as_millis());
            if let Ok(v) = HeaderValue::from_str(&etag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            r
        }
        Ok(Err(e)) => {
            tracing::warn!(%container, %blob, error = %e, "blob not written");
            blob_error(
                StatusCode::CONFLICT,
                "BlobWriteFailed",
                "The blob could not be written under that name",
            )
        }
        Err(_) => blob_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "writer task failed",
        ),
    }
}

fn read_meta(root: &FsPath, container: &str, rel: &FsPath) -> Value {
    let mut name = rel.as_os_str().to_owned();
    name.push(".json");
    std::fs::read(root.join(".meta").join(container).join(name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

async fn read(
    State(st): State<ApiState>,
    Path((container, blob)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    policy_auth(&st, &headers)?;
    check_container(&container)?;
    let rel = blob_path(&blob)?;
    let root = root(&st);
    let path = root.join(&container).join(&rel);
    let (data, meta) = tokio::task::spawn_blocking(move || {
        (std::fs::read(&path), read_meta(&root, &container, &rel))
    })
    .await
    .map_err(|e| ApiError(CloudError::Storage(e.to_string())))?;
    let data = data.map_err(|_| ApiError(CloudError::NotFound(format!("no blob {blob:?}"))))?;
    let mut r = Response::new(Body::from(data));
    let ct = meta["contentType"]
        .as_str()
        .unwrap_or("application/octet-stream");
    if let Ok(v) = HeaderValue::from_str(ct) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    if let Some(enc) = meta["contentEncoding"].as_str()
        && let Ok(v) = HeaderValue::from_str(enc)
    {
        r.headers_mut().insert(header::CONTENT_ENCODING, v);
    }
    Ok(r)
}

/// Every blob under `dir`, as `/`-joined names relative to it.
fn walk(dir: &FsPath, prefix: &str, out: &mut Vec<(String, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= MAX_LIST {
            return;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        // Temporary files of an atomic write in progress.
        if name.starts_with('.') {
            continue;
        }
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path(), &full, out),
            Ok(t) if t.is_file() => {
                out.push((full, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
            _ => {}
        }
    }
}

async fn list(
    State(st): State<ApiState>,
    Path(container): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    policy_auth(&st, &headers)?;
    check_container(&container)?;
    let root = root(&st);
    let blobs = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root.join(&container), "", &mut out);
            out.sort();
            out.into_iter()
                .map(|(name, size)| {
                    let meta = read_meta(&root, &container, FsPath::new(&name));
                    json!({
                        "name": name,
                        "size": size,
                        "contentType": meta["contentType"],
                        "contentEncoding": meta["contentEncoding"],
                    })
                })
                .collect::<Vec<_>>()
        }),
    )
    .await
    .map_err(|_| ApiError(CloudError::Storage("listing timed out".into())))?
    .map_err(|e| ApiError(CloudError::Storage(e.to_string())))?;
    Ok((StatusCode::OK, axum::Json(json!({ "blobs": blobs }))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_container() {
        assert!(blob_path("hub/dev/edgeHub-2026.log").is_ok());
        for bad in ["", "../x", "a/../b", "a//b", "/a", "a/", "./a", "a\\b"] {
            assert!(blob_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_container("logs").is_ok());
        for bad in ["Logs", "ab", "a_b", ".meta"] {
            assert!(check_container(bad).is_err(), "{bad:?}");
        }
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
