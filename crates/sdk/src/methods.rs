//! Module-to-module direct methods over HTTPS (wire notes §6).

use std::time::Duration;

use serde_json::{Value, json};
use verge_core::sas::url_encode;

use crate::Error;
use crate::engine::{API_VERSION, Link};

/// The answer of an invoked method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    /// The status the callee's handler returned.
    pub status: i32,
    /// The callee's JSON payload.
    pub payload: Value,
}

pub(crate) fn http_client(link: &Link) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .tls_backend_preconfigured((*link.tls).clone())
        .user_agent(format!("verge-sdk/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Http(e.to_string()))
}

/// `POST https://{gateway}/twins/{d}[/modules/{m}]/methods?api-version=…`.
pub(crate) async fn invoke(
    link: &Link,
    http: &reqwest::Client,
    device: &str,
    module: Option<&str>,
    method: &str,
    payload: Value,
    timeout: Duration,
) -> Result<MethodResult, Error> {
    let gateway = link.id.gateway.as_deref().ok_or(Error::NotSupported(
        "invoke_method needs a gateway (edge hub)",
    ))?;
    let target = match module {
        Some(m) => format!("{}/modules/{}", url_encode(device), url_encode(m)),
        None => url_encode(device),
    };
    let port = link.opts.https_port;
    let authority = if port == 443 {
        gateway.to_owned()
    } else {
        format!("{gateway}:{port}")
    };
    let url = format!("https://{authority}/twins/{target}/methods?api-version={API_VERSION}");
    let secs = timeout.as_secs().max(1);
    let body = json!({
        "methodName": method,
        "payload": payload,
        "responseTimeoutInSeconds": secs,
        "connectTimeoutInSeconds": secs,
    });
    let (token, _) = link.tokens.token().await?;
    let resp = http
        .post(&url)
        .header("x-ms-edge-moduleId", link.id.client.to_string())
        .header("Authorization", token)
        .json(&body)
        .timeout(timeout + Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| Error::Http(e.to_string()))?;
    if status >= 300 {
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(Error::Service { status, message });
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("method result is not JSON: {e}")))?;
    let status = v
        .get("status")
        .and_then(Value::as_i64)
        .and_then(|s| i32::try_from(s).ok())
        .ok_or_else(|| Error::Protocol("method result has no status".into()))?;
    Ok(MethodResult {
        status,
        payload: v.get("payload").cloned().unwrap_or(Value::Null),
    })
}
