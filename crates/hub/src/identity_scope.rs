//! Child devices from the cloud's device scope, for offline authentication
//! of leaf devices (reference §11).
//!
//! With `[upstream]`, the hub asks the cloud for the identities in its
//! device scope: `POST https://{upstream.hostname}:{upstream.https_port}
//! /devices/{edge}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope`
//! (body `{"pageSize","authChain"}`; answer `{"devices":[Device…],
//! "modules":[…],"continuationLink"}`), over TLS checked against
//! `upstream.ca_file`, authorized by a SAS token of the edge device (signed
//! with `device_key`) or, in edge-environment mode, of the hub's own module
//! identity (signed through verged's workload API). The enabled devices
//! other than the edge itself, with their keys, replace the scope part of
//! the [`SasAuthenticator`]'s table and `device-scope.json` under
//! `storage_dir` (mode 0600: it holds keys), which is loaded at startup so
//! leaf devices connect while the cloud is away. Fetched at startup, every
//! `upstream.scope_refresh_secs`, and after an authentication miss (at most
//! every [`SCOPE_MISS_MIN`], edgeHub's `DeviceScopeCacheRefreshDelaySecs`, so
//! clients with bad tokens cannot make the hub hammer the cloud); failures
//! keep the last list and retry with back-off.
//!
//! X.509 leaf devices (`authentication.type` `selfSigned` with their
//! thumbprints, or `certificateAuthority`) are cached too, disabled ones
//! included so a refusal names the reason; they go to
//! [`SasAuthenticator::set_scope_x509`]. With each fetch the hub also
//! reloads the trust bundle CA-signed leaves must chain to: `trust_bundle`
//! in the configuration, else verged's `GET /trust-bundle` (edge
//! environment); without either, CA-signed leaves are refused.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use verge_core::{ClientId, DeviceId, SasToken, SharedAccessKey};

use crate::HubState;
use crate::auth::{
    IdentityKeys, KeyTable, MissPacer, SasAuthenticator, X509Identity, X509Table, unix_now,
};
use crate::identity::{Task, write_private};

/// API version sent with scope requests (IoT Hub's nested-edge version).
pub const SCOPE_API_VERSION: &str = "2020-06-30-preview";
/// Lifetime of the SAS tokens the hub signs for scope requests.
const TOKEN_TTL_SECS: u64 = 3600;
/// Minimum time between a fetch and one triggered by an authentication miss.
pub const SCOPE_MISS_MIN: Duration = Duration::from_secs(120);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A child device as cached.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScopeDevice {
    device_id: String,
    /// Empty for an X.509 device.
    #[serde(default)]
    primary_key: String,
    #[serde(default)]
    secondary_key: Option<String>,
    /// Set for an X.509 device.
    #[serde(default)]
    x509: Option<verge_x509::X509Auth>,
    #[serde(default = "enabled_default")]
    enabled: bool,
}

fn enabled_default() -> bool {
    true
}

fn x509_table(list: &[ScopeDevice]) -> X509Table {
    list.iter()
        .filter_map(|d| {
            let auth = d.x509.clone()?;
            let id = DeviceId::new(d.device_id.as_str()).ok()?;
            Some((
                ClientId::device(id),
                X509Identity {
                    auth,
                    enabled: d.enabled,
                },
            ))
        })
        .collect()
}

fn table(list: &[ScopeDevice]) -> KeyTable {
    let mut t = KeyTable::new();
    for d in list {
        if d.x509.is_some() || !d.enabled {
            continue;
        }
        let (Ok(id), Ok(primary)) = (
            DeviceId::new(d.device_id.as_str()),
            SharedAccessKey::from_base64(&d.primary_key),
        ) else {
            tracing::warn!(device = %d.device_id, "skipping a device-scope entry with a bad id or key");
            continue;
        };
        let secondary = d
            .secondary_key
            .as_deref()
            .and_then(|k| SharedAccessKey::from_base64(k).ok());
        t.insert(ClientId::device(id), IdentityKeys { primary, secondary });
    }
    t
}

/// The enabled children in a scope answer (the edge device itself left out).
fn children(edge: &str, v: &Value) -> anyhow::Result<Vec<ScopeDevice>> {
    let devices = v
        .get("devices")
        .and_then(Value::as_array)
        .context("the answer has no \"devices\" array")?;
    let mut out = Vec::new();
    for d in devices {
        let Some(id) = d.get("deviceId").and_then(Value::as_str) else {
            continue;
        };
        let enabled = d
            .get("status")
            .and_then(Value::as_str)
            .is_none_or(|s| s.eq_ignore_ascii_case("enabled"));
        if id == edge {
            continue;
        }
        let kind = d
            .pointer("/authentication/type")
            .and_then(Value::as_str)
            .unwrap_or("sas");
        if let Some(auth) = x509_auth(kind, d) {
            out.push(ScopeDevice {
                device_id: id.to_owned(),
                primary_key: String::new(),
                secondary_key: None,
                x509: Some(auth),
                enabled,
            });
            continue;
        }
        if !enabled {
            continue;
        }
        let keys = d.pointer("/authentication/symmetricKey");
        let key = |name: &str| {
            keys.and_then(|k| k.get(name))
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
        };
        // Devices without SAS keys (X.509) cannot be checked here yet.
        let Some(primary_key) = key("primaryKey") else {
            continue;
        };
        out.push(ScopeDevice {
            device_id: id.to_owned(),
            primary_key,
            secondary_key: key("secondaryKey"),
            x509: None,
            enabled: true,
        });
    }
    Ok(out)
}

/// The X.509 registration of a scope entry, for `selfSigned` and
/// `certificateAuthority` (case-insensitive, as the service SDKs vary).
fn x509_auth(kind: &str, d: &Value) -> Option<verge_x509::X509Auth> {
    if kind.eq_ignore_ascii_case("certificateAuthority") {
        return Some(verge_x509::X509Auth::CertificateAuthority);
    }
    if !kind.eq_ignore_ascii_case("selfSigned") {
        return None;
    }
    let thumb = |name: &str| {
        d.pointer(&format!("/authentication/x509Thumbprint/{name}"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .and_then(|t| verge_x509::normalize_thumbprint(t).ok())
    };
    Some(verge_x509::X509Auth::SelfSigned {
        primary: thumb("primaryThumbprint"),
        secondary: thumb("secondaryThumbprint"),
    })
}

/// How the hub proves it is the edge device.
enum Signer {
    /// The edge device's key (config-file mode).
    Device(SharedAccessKey),
    /// The hub's module identity, signed by verged (edge-environment mode).
    Workload(verge_workload::client::WorkloadClient),
}

struct ScopeSource {
    edge: String,
    hub_host: String,
    host: String,
    port: u16,
    /// TLS to the service API's port, through `https_proxy` when set.
    dialer: verge_dial::Dialer,
    signer: Signer,
    cache: std::path::PathBuf,
    auth: Arc<SasAuthenticator>,
    trust: TrustSource,
}

/// Where the trust bundle for CA-signed leaves comes from.
enum TrustSource {
    None,
    File(std::path::PathBuf),
    Workload(verge_workload::client::WorkloadClient),
}

impl ScopeSource {
    async fn token(&self) -> anyhow::Result<String> {
        let expiry = unix_now() + TOKEN_TTL_SECS;
        Ok(match &self.signer {
            Signer::Device(key) => {
                let resource = format!("{}/devices/{}", self.hub_host, self.edge);
                SasToken::sign(&resource, key, expiry, None).to_string()
            }
            Signer::Workload(client) => {
                let resource = format!(
                    "{}/devices/{}/modules/{}",
                    self.hub_host,
                    self.edge,
                    client.module_id()
                );
                let sig = client
                    .sign(SasToken::string_to_sign(&resource, expiry).as_bytes())
                    .await?;
                SasToken::from_signature(&resource, sig, expiry, None).to_string()
            }
        })
    }

    async fn request(&self) -> anyhow::Result<Value> {
        let token = self.token().await?;
        let tls = self.dialer.dial().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let conn_task = tokio::spawn(conn);
        let body = serde_json::json!({ "pageSize": 1000, "authChain": self.edge }).to_string();
        let path = format!(
            "/devices/{}/modules/%24edgeHub/devicesAndModulesInTargetDeviceScope?api-version={SCOPE_API_VERSION}",
            verge_core::sas::url_encode(&self.edge)
        );
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::AUTHORIZATION, token)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        conn_task.abort();
        if !status.is_success() {
            anyhow::bail!(
                "the cloud answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes).context("the answer is not JSON")
    }

    async fn refresh(&self) -> anyhow::Result<usize> {
        let v = tokio::time::timeout(REQUEST_TIMEOUT, self.request())
            .await
            .context("no answer from the cloud")??;
        let list = children(&self.edge, &v)?;
        // Cache first, so what is in force is on disk for the next start.
        let bytes = serde_json::to_vec(&list)?;
        let path = self.cache.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || write_private(&path, &bytes)).await? {
            tracing::warn!(file = %self.cache.display(), error = %e, "cannot cache the device scope");
        }
        self.auth.set_scope_devices(table(&list));
        self.auth.set_scope_x509(x509_table(&list));
        self.reload_trust_bundle().await;
        Ok(list.len())
    }

    async fn load_cache(&self) {
        match tokio::fs::read(&self.cache).await {
            Ok(bytes) => match serde_json::from_slice::<Vec<ScopeDevice>>(&bytes) {
                Ok(list) => {
                    self.auth.set_scope_devices(table(&list));
                    self.auth.set_scope_x509(x509_table(&list));
                    tracing::info!(count = list.len(), "device scope loaded from the cache");
                }
                Err(e) => {
                    tracing::warn!(file = %self.cache.display(), error = %e, "ignoring a corrupt device-scope cache");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.cache.display(), error = %e, "cannot read the device-scope cache");
            }
        }
    }

    /// Reloads the trust bundle (see the module docs); a failure keeps the
    /// last one.
    async fn reload_trust_bundle(&self) {
        let pem = match &self.trust {
            TrustSource::None => return,
            TrustSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("trust_bundle: reading {}", path.display())),
            TrustSource::Workload(client) => {
                tokio::time::timeout(REQUEST_TIMEOUT, client.trust_bundle())
                    .await
                    .context("no answer from verged")
                    .and_then(|r| r.context("verged's trust bundle"))
            }
        };
        match pem.and_then(|pem| {
            verge_x509::parse_certs(&pem).map_err(|e| anyhow::anyhow!("trust bundle: {e}"))
        }) {
            Ok(certs) => self.auth.set_trust_bundle(certs),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot load the trust bundle; keeping the last one")
            }
        }
    }

    async fn run(self, every: Duration, miss_min: Duration) {
        // Before the first fetch, which fails while the cloud is away.
        self.reload_trust_bundle().await;
        let mut misses = self.auth.misses();
        let mut backoff = Duration::from_secs(1);
        let mut pacer = MissPacer::new(miss_min);
        loop {
            let last = match self.refresh().await {
                Ok(n) => {
                    tracing::info!(count = n, "device scope fetched from the cloud");
                    backoff = Duration::from_secs(1);
                    tokio::time::Instant::now()
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot fetch the device scope; keeping the last known");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(every).min(Duration::from_secs(60));
                    continue;
                }
            };
            misses.mark_unchanged();
            tokio::select! {
                () = tokio::time::sleep_until(last + every) => {}
                Ok(()) = misses.changed() => pacer.wait().await,
            }
        }
    }
}

/// Loads the device-scope cache and returns the refresh task; nothing
/// without `[upstream]`.
pub async fn prepare(state: &Arc<HubState>) -> anyhow::Result<Vec<Task>> {
    let cfg = &state.cfg;
    let Some(up) = &cfg.upstream else {
        return Ok(Vec::new());
    };
    crate::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&up.ca_file)
        .with_context(|| format!("upstream.ca_file: reading {}", up.ca_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("upstream.ca_file: parsing {}", up.ca_file.display()))?;
    roots.add_parsable_certificates(certs);
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let proxy = verge_dial::Proxy::from_env(&up.hostname)?;
    let dialer =
        verge_dial::Dialer::new(&up.hostname, up.https_port, Arc::new(tls))?.with_proxy(proxy);
    let signer = if cfg.device_key.is_empty() {
        match &cfg.edge {
            Some(env) => Signer::Workload(env.workload()),
            None => anyhow::bail!("no device_key and no module environment to sign scope requests"),
        }
    } else {
        Signer::Device(
            SharedAccessKey::from_base64(&cfg.device_key)
                .map_err(|e| anyhow::anyhow!("device_key: {}", e.reason))?,
        )
    };
    let src = ScopeSource {
        edge: cfg.device_id.clone(),
        hub_host: cfg.iothub_hostname.clone(),
        host: up.hostname.clone(),
        port: up.https_port,
        dialer,
        signer,
        cache: cfg.storage_dir.join("device-scope.json"),
        auth: state.sas.clone(),
        trust: match (&cfg.trust_bundle, &cfg.edge) {
            (Some(path), _) => TrustSource::File(path.clone()),
            (None, Some(env)) => TrustSource::Workload(env.workload()),
            (None, None) => TrustSource::None,
        },
    };
    src.load_cache().await;
    // Offline starts need it too: CA-signed leaves are checked against it.
    // A file is read now; verged is asked from the task (`run`), so a slow
    // workload socket cannot hold up the listeners.
    if matches!(src.trust, TrustSource::File(_)) {
        src.reload_trust_bundle().await;
    }
    let every = Duration::from_secs(up.scope_refresh_secs);
    Ok(vec![Box::pin(src.run(every, SCOPE_MISS_MIN))])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn children_of_an_answer() {
        let k = "AAAAAAAAAAAAAAAAAAAAAA==";
        let v = serde_json::json!({"devices": [
            {"deviceId": "edge", "status": "enabled", "authentication": {"symmetricKey": {"primaryKey": k}}},
            {"deviceId": "leaf1", "status": "enabled", "authentication": {"symmetricKey": {"primaryKey": k, "secondaryKey": k}}},
            {"deviceId": "off", "status": "disabled", "authentication": {"symmetricKey": {"primaryKey": k}}},
            {"deviceId": "x509", "status": "enabled", "authentication": {"symmetricKey": {"primaryKey": null}}},
        ], "modules": [], "continuationLink": null});
        let c = children("edge", &v).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].device_id, "leaf1");
        let t = table(&c);
        assert!(t[&ClientId::parse("leaf1").unwrap()].secondary.is_some());
        assert!(children("edge", &serde_json::json!({})).is_err());
    }

    #[test]
    fn x509_children_are_kept_with_their_status() {
        let t = "ab".repeat(32);
        let v = serde_json::json!({"devices": [
            {"deviceId": "ss", "status": "enabled", "authentication": {"type": "selfSigned",
                "symmetricKey": {"primaryKey": null}, "x509Thumbprint": {"primaryThumbprint": t, "secondaryThumbprint": null}}},
            {"deviceId": "ca", "status": "enabled", "authentication": {"type": "certificateAuthority"}},
            {"deviceId": "off", "status": "disabled", "authentication": {"type": "certificateAuthority"}},
        ]});
        let c = children("edge", &v).unwrap();
        assert_eq!(c.len(), 3);
        // No SAS entries; the X.509 table holds all three, "off" disabled.
        assert!(table(&c).is_empty());
        let x = x509_table(&c);
        let get = |id: &str| x[&ClientId::parse(id).unwrap()].clone();
        assert_eq!(
            get("ss").auth,
            verge_x509::X509Auth::SelfSigned {
                primary: Some(t.to_ascii_uppercase()),
                secondary: None
            }
        );
        assert_eq!(get("ca").auth, verge_x509::X509Auth::CertificateAuthority);
        assert!(get("ca").enabled && !get("off").enabled);
        // The cache round-trips, and an old cache (keys only) still loads.
        let back: Vec<ScopeDevice> =
            serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(x509_table(&back), x);
        let old: Vec<ScopeDevice> =
            serde_json::from_str(r#"[{"deviceId":"l","primaryKey":"AAAAAAAAAAAAAAAAAAAAAA=="}]"#)
                .unwrap();
        assert_eq!(table(&old).len(), 1);
        assert!(x509_table(&old).is_empty());
    }
}
