//! A minimal HTTP/1.1 client for verged's Unix sockets (one connection per
//! request), plus typed helpers for the workload API that other crates (the
//! hub fetching its server certificate) can use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::api::{
    CertificateResponse, ErrorResponse, HubModuleIdentity, ServerCertificateRequest, SignRequest,
    SignResponse, TrustBundleResponse, WORKLOAD_API_VERSION,
};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not talk to the socket.
    #[error("{socket}: {reason}")]
    Transport {
        /// The socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The daemon answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// Status code.
        status: u16,
        /// `message` from the body (or the raw body).
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("unexpected response: {0}")]
    Decode(String),
}

/// Turns `unix:///path` into `/path`.
pub fn socket_path_from_uri(uri: &str) -> Option<PathBuf> {
    uri.strip_prefix("unix://").map(PathBuf::from)
}

/// A raw response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

/// Sends one request over the socket (`path_and_query` starting with `/`).
/// `body` is sent without a Content-Type header, as the Azure SDK does.
pub async fn request(
    socket: &Path,
    method: &str,
    path_and_query: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<RawResponse, ClientError> {
    let transport = |reason: String| ClientError::Transport {
        socket: socket.to_path_buf(),
        reason,
    };
    let work = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        let conn_task = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("Host", "localhost")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        conn_task.abort();
        Ok(RawResponse { status, body })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| transport(format!("no answer within {timeout:?}")))?
}

async fn json_call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, ClientError> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let pq = format!("{path}{sep}api-version={WORKLOAD_API_VERSION}");
    let r = request(socket, method, &pq, body, Duration::from_secs(30)).await?;
    if !(200..300).contains(&r.status) {
        let message = serde_json::from_slice::<ErrorResponse>(&r.body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned());
        return Err(ClientError::Status {
            status: r.status,
            message,
        });
    }
    serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Typed workload API client for one module.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    socket: PathBuf,
    module_id: String,
    generation_id: String,
}

fn enc(s: &str) -> String {
    verge_core::sas::url_encode(s)
}

impl WorkloadClient {
    /// A client for `module_id` (generation `generation_id`) over `socket`.
    pub fn new(socket: impl Into<PathBuf>, module_id: &str, generation_id: &str) -> Self {
        Self {
            socket: socket.into(),
            module_id: module_id.to_owned(),
            generation_id: generation_id.to_owned(),
        }
    }

    /// From the module environment (`IOTEDGE_WORKLOADURI`, `IOTEDGE_MODULEID`,
    /// `IOTEDGE_MODULEGENERATIONID`).
    pub fn from_env() -> Option<Self> {
        let uri = std::env::var("IOTEDGE_WORKLOADURI").ok()?;
        let module = std::env::var("IOTEDGE_MODULEID").ok()?;
        let genid = std::env::var("IOTEDGE_MODULEGENERATIONID").ok()?;
        Some(Self::new(socket_path_from_uri(&uri)?, &module, &genid))
    }

    /// `GET /trust-bundle` → PEM.
    pub async fn trust_bundle(&self) -> Result<String, ClientError> {
        let r: TrustBundleResponse = json_call(&self.socket, "GET", "/trust-bundle", None).await?;
        Ok(r.certificate)
    }

    /// `POST …/sign` → base64 digest of `data`.
    pub async fn sign(&self, data: &[u8]) -> Result<String, ClientError> {
        use base64::Engine as _;
        let body = serde_json::to_vec(&SignRequest {
            key_id: Some("primary".into()),
            algo: Some("HMACSHA256".into()),
            data: base64::engine::general_purpose::STANDARD.encode(data),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        let path = format!(
            "/modules/{}/genid/{}/sign",
            enc(&self.module_id),
            enc(&self.generation_id)
        );
        let r: SignResponse = json_call(&self.socket, "POST", &path, Some(body)).await?;
        Ok(r.digest)
    }

    /// The module identities with their keys (Verge extension, the hub's
    /// socket only: `GET /modules/{self}/identities`).
    pub async fn hub_identities(&self) -> Result<Vec<HubModuleIdentity>, ClientError> {
        let path = format!("/modules/{}/identities", enc(&self.module_id));
        json_call(&self.socket, "GET", &path, None).await
    }

    /// The module id this client acts as.
    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    /// `POST …/certificate/server` for `common_name` (the hub's TLS certificate).
    pub async fn server_certificate(
        &self,
        common_name: &str,
    ) -> Result<CertificateResponse, ClientError> {
        let body = serde_json::to_vec(&ServerCertificateRequest {
            common_name: common_name.to_owned(),
            expiration: None,
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        let path = format!(
            "/modules/{}/genid/{}/certificate/server",
            enc(&self.module_id),
            enc(&self.generation_id)
        );
        json_call(&self.socket, "POST", &path, Some(body)).await
    }
}
