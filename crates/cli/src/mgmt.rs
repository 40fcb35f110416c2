//! Talking to verged's management API: finding the socket, turning transport
//! and HTTP failures into messages that say what to do, and streaming logs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use verge_daemon::api::{
    AgentInfo, CertificateList, ErrorResponse, ImagePulls, ModuleDetails, ModuleList, SystemInfo,
};
use verge_daemon::client::{ClientError, request, socket_path_from_uri};

/// The management API version verged serves (the one aziot-edged gives the agent).
pub const API_VERSION: &str = "2022-08-03";

/// Where verged listens when the config cannot be read (its default homedir).
pub fn default_socket() -> PathBuf {
    Path::new(verge_daemon::config::DEFAULT_HOMEDIR).join("mgmt.sock")
}

/// How long a non-streaming call may take: a restart waits for the module
/// to stop (up to verged's 30 s stop timeout) and start again.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A management API endpoint and how it was chosen (for error messages).
#[derive(Debug, Clone)]
pub struct Mgmt {
    /// The socket path.
    pub socket: PathBuf,
    /// Why this socket: `-H`, the config file, or the default.
    pub origin: String,
}

impl Mgmt {
    /// `-H unix:///path` wins; then the config file's `[listen] management_uri`
    /// (or its homedir default). An unreadable default config (it is mode 0600,
    /// so that is the usual case for non-root users) falls back to verged's
    /// default socket; an explicit `--config` that cannot be read is an error.
    pub fn resolve(host: Option<&str>, config: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(host) = host {
            let socket = socket_path_from_uri(host).ok_or_else(|| {
                anyhow!("-H {host:?}: only unix:///absolute/path management URIs are supported")
            })?;
            return Ok(Self {
                socket,
                origin: "-H".to_owned(),
            });
        }
        let explicit = config.is_some();
        let path = config.unwrap_or(Path::new(crate::DEFAULT_CONFIG));
        match verge_daemon::config::Config::load(path) {
            Ok(c) => Ok(Self {
                socket: c.listen.management_socket,
                origin: format!("from {}", path.display()),
            }),
            Err(e) if explicit => Err(anyhow!("{e}")),
            Err(_) => Ok(Self {
                socket: default_socket(),
                origin: format!(
                    "the default; {} could not be read, pass --config FILE or -H unix:///PATH",
                    path.display()
                ),
            }),
        }
    }

    /// `unix:///path` of the socket.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn unreachable(&self, reason: &str) -> anyhow::Error {
        anyhow!(
            "cannot reach verged at {} ({}): {reason}\n\
             Is verged running? Check with `systemctl status verged`, or start it with \
             `verged --config /etc/verge/config.toml`.",
            self.uri(),
            self.origin
        )
    }

    fn map_err(&self, e: ClientError) -> anyhow::Error {
        match e {
            ClientError::Transport { reason, .. } => self.unreachable(&reason),
            ClientError::Status { status, message } => status_error(status, &message),
            ClientError::Decode(m) => anyhow!("verged sent an unexpected answer: {m}"),
        }
    }

    fn path_with_version(path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}api-version={API_VERSION}")
    }

    /// One request; the body of a 2xx answer, else an error.
    pub async fn call(&self, method: &str, path: &str) -> anyhow::Result<Bytes> {
        let r = request(
            &self.socket,
            method,
            &Self::path_with_version(path),
            None,
            CALL_TIMEOUT,
        )
        .await
        .map_err(|e| self.map_err(e))?;
        if !(200..300).contains(&r.status) {
            return Err(status_error(r.status, &error_message(&r.body)));
        }
        Ok(r.body)
    }

    /// One request with a JSON body; the body of a 2xx answer, else an error.
    pub async fn call_json(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Bytes> {
        let r = request(
            &self.socket,
            method,
            &Self::path_with_version(path),
            Some(body.to_string().into_bytes()),
            CALL_TIMEOUT,
        )
        .await
        .map_err(|e| self.map_err(e))?;
        if !(200..300).contains(&r.status) {
            return Err(status_error(r.status, &error_message(&r.body)));
        }
        Ok(r.body)
    }

    /// The `message` of a JSON answer (verged's `/system/*`), or the text.
    pub fn message(body: &[u8]) -> String {
        error_message(body)
    }

    /// `GET` a JSON document.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self.call("GET", path).await?;
        serde_json::from_slice(&body)
            .with_context(|| format!("verged's answer to GET {path} is not the expected JSON"))
    }

    /// The modules, sorted by name (verged sorts them too).
    pub async fn modules(&self) -> anyhow::Result<Vec<ModuleDetails>> {
        let mut list: ModuleList = self.get_json("/modules").await?;
        list.modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list.modules)
    }

    /// `GET /systeminfo`.
    pub async fn system_info(&self) -> anyhow::Result<SystemInfo> {
        self.get_json("/systeminfo").await
    }

    /// `GET` a JSON document that an older verged (or one without the
    /// feature) answers with 404: `None` then.
    pub async fn get_json_opt<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<Option<T>> {
        let r = request(
            &self.socket,
            "GET",
            &Self::path_with_version(path),
            None,
            CALL_TIMEOUT,
        )
        .await
        .map_err(|e| self.map_err(e))?;
        match r.status {
            404 => Ok(None),
            200..300 => serde_json::from_slice(&r.body)
                .map(Some)
                .with_context(|| format!("verged's answer to GET {path} is not the expected JSON")),
            s => Err(status_error(s, &error_message(&r.body))),
        }
    }

    /// `GET /systeminfo/agent`: the agent verged supervises (`None`: it
    /// supervises none, or predates the endpoint).
    pub async fn agent(&self) -> anyhow::Result<Option<AgentInfo>> {
        self.get_json_opt("/systeminfo/agent").await
    }

    /// `GET /images/pulls` (`None`: verged predates the endpoint).
    pub async fn pulls(&self) -> anyhow::Result<Option<ImagePulls>> {
        self.get_json_opt("/images/pulls").await
    }

    /// `GET /certificates` (`None`: verged predates the endpoint).
    pub async fn certificates(&self) -> anyhow::Result<Option<CertificateList>> {
        self.get_json_opt("/certificates").await
    }

    /// Streams a response body into `out` as it arrives (logs with `follow`
    /// never end by themselves). The call timeout bounds the wait for the
    /// answer's head only, never the stream.
    pub async fn stream(&self, path: &str, out: &mut dyn Write) -> anyhow::Result<()> {
        let pq = Self::path_with_version(path);
        let head = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.unreachable(&e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.unreachable(&e.to_string()))?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method("GET")
                .uri(pq.as_str())
                .header("Host", "localhost")
                .body(Empty::<Bytes>::new())
                .context("building the request")?;
            sender
                .send_request(req)
                .await
                .map_err(|e| self.unreachable(&e.to_string()))
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, head)
            .await
            .map_err(|_| self.unreachable(&format!("no answer within {CALL_TIMEOUT:?}")))??;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if !(200..300).contains(&status) {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(status_error(status, &error_message(&bytes)));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| anyhow!("the log stream broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                // A closed pipe (`verge logs m | head`) ends the command quietly.
                if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The `message` of verged's JSON error body, or the raw body.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorResponse>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned())
}

fn status_error(status: u16, message: &str) -> anyhow::Error {
    match status {
        403 => anyhow!(
            "verged refused: {message}\n\
             Changing modules needs root or verged's own user: try again with sudo."
        ),
        404 => anyhow!("{message} (`verge list` shows the modules)"),
        _ => anyhow!("verged answered HTTP {status}: {message}"),
    }
}

/// Percent-encodes a module name for a path segment.
pub fn enc(name: &str) -> String {
    verge_core::sas::url_encode(name)
}
