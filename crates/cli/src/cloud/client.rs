//! verge-cloud's service API as the CLI reaches it: the service
//! connection string, TLS trust, a SAS token per request, IoT Hub-shaped
//! errors turned into advice, JSON and line-streamed bodies.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::Value;
use verge_core::{SasToken, SharedAccessKey};

/// Lifetime of the tokens the CLI signs (one per request).
const TOKEN_TTL_SECS: u64 = 3600;
/// Non-streaming requests: a direct method may take up to 300 s plus connect.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);

/// A parsed service connection string.
#[derive(Clone)]
pub struct ServiceConnection {
    /// Host (SAS audience, and what is dialled).
    pub host: String,
    /// HTTPS port (443 unless `HostName` has one).
    pub port: u16,
    /// Policy name.
    pub policy: String,
    /// Policy key.
    pub key: SharedAccessKey,
}

impl std::fmt::Debug for ServiceConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConnection")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServiceConnection {
    /// Parses `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (mut host, mut policy, mut key) = (None, None, None);
        for part in s.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("{part:?} is not Key=Value"))?;
            match k.trim() {
                "HostName" => host = Some(v.trim().to_owned()),
                "SharedAccessKeyName" => policy = Some(v.trim().to_owned()),
                "SharedAccessKey" => key = Some(v.trim().to_owned()),
                "DeviceId" | "ModuleId" => bail!(
                    "this is a device connection string; `verge cloud` needs the service \
                     connection string (with SharedAccessKeyName=iothubowner)"
                ),
                _ => {}
            }
        }
        let host = host.ok_or_else(|| anyhow!("HostName is missing"))?;
        let policy = policy.ok_or_else(|| anyhow!("SharedAccessKeyName is missing"))?;
        let key = key.ok_or_else(|| anyhow!("SharedAccessKey is missing"))?;
        let key = SharedAccessKey::from_base64(&key)
            .map_err(|e| anyhow!("SharedAccessKey: {}", e.reason))?;
        let (host, port) = match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (
                h.to_owned(),
                p.parse()
                    .map_err(|_| anyhow!("HostName {host:?}: the port is not a number"))?,
            ),
            _ => (host, 443),
        };
        if host.is_empty() {
            bail!("HostName is empty");
        }
        Ok(Self {
            host,
            port,
            policy,
            key,
        })
    }
}

/// A client of verge-cloud's service API.
#[derive(Clone)]
pub struct CloudClient {
    conn: ServiceConnection,
    base: String,
    http: reqwest::Client,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// A rustls config trusting `ca` (PEM file) or the system roots.
fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the CA file {}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| anyhow!("{}: bad PEM: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow!("{}: bad CA certificate: {e}", path.display()))?;
            }
            if roots.is_empty() {
                bail!("{} holds no certificate", path.display());
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // An unusable system certificate is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CloudClient {
    /// A client for the connection string, trusting `ca` (or the system roots).
    pub fn new(connection_string: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let conn = ServiceConnection::parse(connection_string)
            .context("the service connection string is not valid")?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(ca)?)
            .user_agent(format!("verge-cli/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow!("cannot set up the HTTPS client: {}", error_chain(&e)))?;
        let base = format!("https://{}:{}", conn.host, conn.port);
        Ok(Self { conn, base, http })
    }

    fn token(&self) -> String {
        SasToken::sign(
            &self.conn.host,
            &self.conn.key,
            now_secs() + TOKEN_TTL_SECS,
            Some(&self.conn.policy),
        )
        .to_string()
    }

    pub(super) fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let chain = error_chain(e);
        let lower = chain.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            anyhow!(
                "cannot verify verge-cloud's certificate at {}: {chain}\n\
                 Pass the CA that signed it with --ca (verge-cloud generates <data_dir>/tls/ca.pem) \
                 or VERGE_CLOUD_CA.",
                self.base
            )
        } else if e.is_timeout() {
            anyhow!(
                "verge-cloud at {} did not answer in time: {chain}",
                self.base
            )
        } else {
            anyhow!(
                "cannot reach verge-cloud at {}: {chain}\n\
                 Is it running, and is HostName (with :port) in the connection string right?",
                self.base
            )
        }
    }

    pub(super) fn builder(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.http
            .request(
                method,
                format!("{}{path}{sep}api-version=2021-04-12", self.base),
            )
            .header("Authorization", self.token())
    }

    pub(super) async fn check(&self, r: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(r);
        }
        let body = r.bytes().await.unwrap_or_default();
        Err(status_error(status, &body))
    }

    /// One request with an optional JSON body; the answer's JSON (`null` when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        self.call_if_match(method, path, body, None).await
    }

    /// [`Self::call`] with an `If-Match` header (`*`: create or replace).
    pub async fn call_if_match(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut b = self.builder(method, path).timeout(REQUEST_TIMEOUT);
        if let Some(m) = if_match {
            b = b.header("If-Match", m);
        }
        if let Some(v) = body {
            b = b
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(v)?);
        }
        let r = b.send().await.map_err(|e| self.transport_error(&e))?;
        let r = self.check(r).await?;
        let bytes = r.bytes().await.map_err(|e| self.transport_error(&e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).context("verge-cloud's answer is not JSON")
    }

    /// `GET` JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `GET /verge/messages` as a response whose body streams NDJSON.
    pub async fn messages(&self, from: u64, follow: bool) -> anyhow::Result<reqwest::Response> {
        let r = self
            .builder(
                reqwest::Method::GET,
                &format!("/verge/messages?from={from}&follow={follow}"),
            )
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        self.check(r).await
    }

    /// A device's connection string (its primary key).
    pub fn device_connection_string(&self, device: &Value) -> Option<String> {
        let id = device.get("deviceId")?.as_str()?;
        let key = device
            .pointer("/authentication/symmetricKey/primaryKey")?
            .as_str()?;
        Some(format!(
            "HostName={};DeviceId={id};SharedAccessKey={key}",
            self.conn.host
        ))
    }
}

/// The text of an IoT Hub-shaped error body (`{"Message":"ErrorCode:X;text"}`).
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("Message").and_then(Value::as_str).map(str::to_owned))
        .map(|m| match m.split_once(';') {
            Some((code, text)) if code.starts_with("ErrorCode:") => text.to_owned(),
            _ => m,
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

fn status_error(status: u16, body: &[u8]) -> anyhow::Error {
    let text = error_text(body);
    match status {
        401 | 403 => anyhow!(
            "verge-cloud refused the credentials ({text}).\n\
             Check the service connection string: the policy (SharedAccessKeyName=iothubowner), \
             its key, and HostName must be verge-cloud's host name."
        ),
        404 => anyhow!("not found: {text}"),
        409 => anyhow!("already exists: {text}"),
        412 => anyhow!("changed meanwhile (etag mismatch): {text}; try again"),
        _ => anyhow!("verge-cloud answered HTTP {status}: {text}"),
    }
}

/// Reads a response body as JSON (reqwest's `json` feature is not used).
pub(super) async fn json_bytes(r: reqwest::Response) -> anyhow::Result<Value> {
    let bytes = r
        .bytes()
        .await
        .map_err(|e| anyhow!("reading verge-cloud's answer: {}", error_chain(&e)))?;
    serde_json::from_slice(&bytes).context("verge-cloud's answer is not JSON")
}

/// Calls `each` with every complete line of a streaming body; stops when it
/// returns false or the stream ends.
pub async fn stream_lines(
    mut r: reqwest::Response,
    mut each: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = r
            .chunk()
            .await
            .map_err(|e| anyhow!("the message stream broke off: {}", error_chain(&e)))?;
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..nl]);
            if !line.trim().is_empty() && !each(line.trim_end_matches('\r')) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_service_connection_strings() {
        let c = ServiceConnection::parse(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("localhost", 8443));
        assert_eq!(c.policy, "iothubowner");
        let c = ServiceConnection::parse(
            "HostName=h.example;SharedAccessKeyName=p;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==",
        )
        .unwrap();
        assert_eq!(c.port, 443);
        let e = ServiceConnection::parse(
            "HostName=h;DeviceId=d;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==",
        )
        .unwrap_err();
        assert!(e.to_string().contains("device connection string"), "{e}");
        assert!(ServiceConnection::parse("HostName=h;SharedAccessKeyName=p").is_err());
        assert!(
            ServiceConnection::parse("HostName=h:x;SharedAccessKeyName=p;SharedAccessKey=AAAA")
                .is_err()
        );
    }
}
