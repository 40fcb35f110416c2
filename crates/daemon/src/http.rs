//! Shared HTTP plumbing: error bodies, the `api-version` check, peer
//! credentials, and serving a router on a Unix socket (through
//! verge-listen: a connection cap per socket and HTTP deadlines, so idle or
//! stalled clients of one socket never take the descriptors another socket
//! or the management API needs).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use tokio::net::{UnixListener, UnixStream};

use crate::api::ErrorResponse;

/// An error answered as `{"message": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message.
    pub message: String,
}

impl ApiError {
    /// Any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    /// 400.
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    /// 403.
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    /// 404.
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    /// 500.
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &ErrorResponse {
                message: self.message,
            },
        )
    }
}

/// A JSON response with an explicit status.
pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            let mut r = Response::new(Body::from(format!(
                "{{\"message\":\"serialization failed: {e}\"}}"
            )));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    }
}

/// Parses a JSON body regardless of Content-Type (the Azure SDK sends none).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Middleware: every request must carry a non-empty `api-version` query parameter.
pub async fn require_api_version(req: Request, next: Next) -> Response {
    let ok = req.uri().query().is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
    });
    if !ok {
        return ApiError::bad_request("the api-version query parameter is required")
            .into_response();
    }
    next.run(req).await
}

/// The caller's credentials, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// User id (None if unavailable).
    pub uid: Option<u32>,
    /// Process id (None if unavailable).
    pub pid: Option<i32>,
}

impl PeerCred {
    /// The credentials of `stream`'s peer.
    pub fn of(stream: &UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(c) => PeerCred {
                uid: Some(c.uid()),
                pid: c.pid(),
            },
            Err(_) => PeerCred {
                uid: None,
                pid: None,
            },
        }
    }
}

impl Connected<IncomingStream<'_, UnixListener>> for PeerCred {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self::of(stream.io())
    }
}

/// A Unix socket's connection cap and HTTP deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Request head / idle gap, stalled body, stalled write, grace at stop.
    pub timeouts: verge_listen::http::Timeouts,
}

impl SocketLimits {
    /// One module's workload socket: 1/32 of `RLIMIT_NOFILE`, between 8
    /// and 64 (a module needs a few at a time; dozens of modules fit).
    pub fn workload() -> Self {
        Self::share(32, 8, 64)
    }

    /// The management socket: 1/8 of `RLIMIT_NOFILE`, between 16 and 256.
    pub fn management() -> Self {
        Self::share(8, 16, 256)
    }

    fn share(divisor: u64, min: usize, max: usize) -> Self {
        let limit = verge_listen::fds::fd_limit().unwrap_or(u64::MAX);
        let n = usize::try_from(limit / divisor).unwrap_or(usize::MAX);
        Self {
            max_connections: n.clamp(min, max),
            timeouts: verge_listen::http::Timeouts {
                header: std::time::Duration::from_secs(10),
                body: std::time::Duration::from_secs(10),
                write: std::time::Duration::from_secs(30),
                grace: std::time::Duration::from_secs(2),
            },
        }
    }
}

/// Binds a Unix socket (removing a stale file first) with `mode`.
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// A served socket: dropping/`shutdown` stops it and removes the file.
#[derive(Debug)]
pub struct ServedSocket {
    path: PathBuf,
    cancel: verge_listen::CancellationToken,
    tracker: verge_listen::TaskTracker,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServedSocket {
    /// Serves `router` on `listener` (bound at `path`), with peer
    /// credentials, and the management socket's limits.
    pub fn serve(path: PathBuf, listener: UnixListener, router: Router) -> Self {
        Self::serve_with(path, listener, router, SocketLimits::management())
    }

    /// [`ServedSocket::serve`] with explicit limits.
    pub fn serve_with(
        path: PathBuf,
        listener: UnixListener,
        router: Router,
        limits: SocketLimits,
    ) -> Self {
        let cancel = verge_listen::CancellationToken::new();
        let tracker = verge_listen::TaskTracker::new();
        let name = path.display().to_string();
        let caps = verge_listen::Limits {
            max_connections: limits.max_connections,
            max_per_peer: limits.max_connections,
            handshake_timeout: limits.timeouts.header,
        };
        let timeouts = limits.timeouts;
        let run = verge_listen::Listener::new(name, listener, caps, cancel.clone())
            .with_tracker(tracker.clone())
            .run(move |stream: UnixStream, conn: verge_listen::Conn| {
                let router = router.clone();
                async move {
                    let cred = PeerCred::of(&stream);
                    let svc = hyper_util::service::TowerToHyperService::new(router);
                    verge_listen::http::serve(stream, svc, ConnectInfo(cred), timeouts, &conn)
                        .await;
                }
            });
        Self {
            path,
            cancel,
            tracker,
            task: Some(tokio::spawn(run)),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, gives open connections up to 2 s, removes the file.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.tracker.close();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            let tracker = self.tracker.clone();
            let drained = async move {
                let _ = task.await;
                tracker.wait().await;
            };
            if tokio::time::timeout(std::time::Duration::from_secs(3), drained)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

impl Drop for ServedSocket {
    fn drop(&mut self) {
        // Connections see the cancellation and end within their grace.
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
