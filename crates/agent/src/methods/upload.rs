//! Uploads to a blob container given by a SAS URL
//! (`https://host/container?sv=…&sig=…`), as Azure Blob Storage's `Put
//! Blob` takes them: the blob's name goes into the path after the
//! container, the SAS query stays, `x-ms-blob-type: BlockBlob`.
//!
//! The HTTPS client trusts what the agent's twin link trusts (the workload
//! API's trust bundle, `--upstream-ca`, the system roots), so a self-hosted
//! verge-cloud's private CA works as IoT Hub's public chain does. It is
//! built at the first upload (the workload API may not be up when the agent
//! starts) and kept.

use std::time::Duration;

use tokio::sync::OnceCell;
use verge_sdk::EdgeEnvironment;

/// Time allowed for one blob upload (connect, send, answer).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the CA certificates to trust come from.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The agent's edge environment: the workload API's trust bundle.
    pub env: Option<EdgeEnvironment>,
    /// Another CA (PEM), e.g. `--upstream-ca`.
    pub extra_ca_pem: Option<String>,
}

/// A blob to write.
#[derive(Debug)]
pub struct Blob<'a> {
    /// Name inside the container (`hub/device/file.log`).
    pub name: &'a str,
    /// `Content-Type`.
    pub content_type: &'a str,
    /// `Content-Encoding` (`gzip`), if any.
    pub content_encoding: Option<&'a str>,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The uploader: trust, and the client once built.
#[derive(Debug)]
pub struct Uploader {
    trust: Trust,
    client: OnceCell<reqwest::Client>,
}

/// `sasUrl` with `blob` appended to its path (each `/`-separated part
/// percent-encoded), its query kept.
pub fn blob_url(sas_url: &str, blob: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(sas_url).map_err(|e| format!("invalid sasUrl: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err("sasUrl must be an http(s) URL with a host".into());
    }
    {
        let mut segs = url
            .path_segments_mut()
            .map_err(|()| "sasUrl cannot take a path".to_owned())?;
        segs.pop_if_empty();
        for part in blob.split('/') {
            segs.push(part);
        }
    }
    Ok(url)
}

impl Uploader {
    /// An uploader trusting `trust`.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_try_init(|| async {
                let mut pems = Vec::new();
                if let Some(env) = &self.trust.env {
                    let socket = verge_workload::client::socket_path_from_uri(&env.workload_uri)
                        .ok_or_else(|| {
                            format!("workload URI {:?} is not unix:///path", env.workload_uri)
                        })?;
                    let wl = verge_workload::client::WorkloadClient::new(
                        socket,
                        &env.module_id,
                        &env.generation_id,
                    );
                    pems.push(
                        wl.trust_bundle()
                            .await
                            .map_err(|e| format!("trust bundle: {e}"))?,
                    );
                }
                pems.extend(self.trust.extra_ca_pem.clone());
                let refs: Vec<&str> = pems.iter().map(String::as_str).collect();
                let tls = verge_sdk::upstream_tls_config(&refs).map_err(|e| e.to_string())?;
                reqwest::Client::builder()
                    .tls_backend_preconfigured((*tls).clone())
                    .user_agent(format!("verge-agent/{}", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(20))
                    .timeout(UPLOAD_TIMEOUT)
                    .build()
                    .map_err(|e| format!("HTTPS client: {e}"))
            })
            .await
    }

    /// Writes `blob` into the container of `sas_url` (one `Put Blob`).
    pub async fn put(&self, sas_url: &str, blob: Blob<'_>) -> Result<(), String> {
        let url = blob_url(sas_url, blob.name)?;
        let client = self.client().await?;
        let mut req = client
            .put(url)
            .header("x-ms-blob-type", "BlockBlob")
            .header("x-ms-version", "2020-04-08")
            .header(reqwest::header::CONTENT_TYPE, blob.content_type);
        if let Some(enc) = blob.content_encoding {
            req = req.header(reqwest::header::CONTENT_ENCODING, enc);
        }
        let resp = req
            .body(blob.data)
            .send()
            .await
            .map_err(|e| format!("uploading {}: {e}", blob.name))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        let excerpt: String = body.chars().take(300).collect();
        Err(format!(
            "uploading {}: the blob service answered {status}: {excerpt}",
            blob.name
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blob_names_go_after_the_container_and_the_sas_stays() {
        let u = blob_url(
            "https://acct.blob.core.windows.net/logs?sv=2020&sig=a%2Bb",
            "hub/dev 1/edgeHub-2026.log",
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "https://acct.blob.core.windows.net/logs/hub/dev%201/edgeHub-2026.log?sv=2020&sig=a%2Bb"
        );
        let u = blob_url("https://127.0.0.1:8443/verge/blobs/c/?sig=x", "a/b").unwrap();
        assert_eq!(u.path(), "/verge/blobs/c/a/b");
        assert!(blob_url("ftp://h/c", "a").is_err());
        assert!(blob_url("not a url", "a").is_err());
    }
}
