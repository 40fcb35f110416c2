//! Module identities in the cloud: verged registers every module identity
//! it holds in the hub, with the keys it derives, as Azure IoT Edge's
//! identity service does, so module tokens signed through the workload API
//! are also valid in the cloud.
//!
//! It speaks IoT Hub's module registry as the device itself (a SAS token of
//! `{hub}/devices/{d}` signed with the device key, or, for an X.509 device,
//! its client certificate in the TLS handshake and no token): `GET
//! /devices/{d}/modules`, then `PUT /devices/{d}/modules/{m}` (`If-Match:
//! "*"`, create or update) for every local identity whose keys or
//! `managedBy` differ there, with `authentication: {type: sas,
//! symmetricKey: {primaryKey: k, secondaryKey: k}}` where `k` is the
//! derived module key (verged derives one key per identity and signs with
//! it as `primary`; the same key as secondary keeps the cloud from
//! inventing one nobody on the edge knows), and `DELETE` for identities
//! deleted here (the store's tombstones).
//!
//! # Why a full reconcile instead of a queue of pending calls
//!
//! The identity store is the durable truth and already persisted (tombstones
//! included), so one pass that makes the cloud match it is correct after any
//! number of changes, failures and restarts: latest state wins per module by
//! construction, nothing new must be persisted, and the "queue" is one
//! coalescing change counter (a `watch` channel), so it cannot grow. A pass
//! costs one `GET` plus a call per module that actually differs — tens of
//! modules at most on a gateway.
//!
//! A pass runs at startup, after every identity change, and, while the cloud
//! cannot be reached or refuses, again after a back-off (1 s doubling to
//! 60 s). It runs in its own task: module start-up and the management API
//! never wait for it. Going offline and coming back are logged once each,
//! not per attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use verge_core::id::{DeviceId, HubHostname};
use verge_core::sas::{SasToken, url_encode};

use crate::config::DeviceCredential;
use crate::keys::{IdentityStore, Tombstone};

/// First retry delay after a failed pass.
pub const RETRY_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Lifetime of the device tokens verged signs for its calls.
const TOKEN_TTL_SECS: u64 = 3600;
/// IoT Hub's service API version for the module registry.
const API_VERSION: &str = "2021-04-12";

/// Where and as whom to register.
#[derive(Clone)]
pub struct CloudTarget {
    /// The hub (SAS audience and HTTPS host).
    pub hub: HubHostname,
    /// Its HTTPS port.
    pub https_port: u16,
    /// This device.
    pub device_id: DeviceId,
    /// CA certificates to trust besides the system roots (PEM).
    pub trust_pem: String,
    /// How the device authenticates.
    pub credential: DeviceCredential,
}

/// The registration task's client.
pub struct CloudIdentities {
    http: reqwest::Client,
    base: String,
    target: CloudTarget,
    store: IdentityStore,
}

/// The TLS client config: [`tls_config`] trusting `trust_pem`, presenting
/// the device's certificate when `credential` is X.509 (DPS and the module
/// registry). Read at every start, so a renewed certificate file is used
/// after a restart.
pub(crate) fn client_tls(
    trust_pem: &str,
    credential: &DeviceCredential,
) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let DeviceCredential::X509 { cert, key } = credential else {
        return tls_config(trust_pem, None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("identity_cert {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "identity_cert {} holds no certificate",
        cert.display()
    );
    let pk = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("identity_pk {}", key.display()))?;
    tls_config(trust_pem, Some((chain, pk)))
}

pub(crate) fn tls_config(
    extra_pem: &str,
    client_cert: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(extra_pem.as_bytes()) {
        // One unusable certificate in the bundle must not cost the rest.
        match cert {
            Ok(c) => {
                if let Err(e) = roots.add(c) {
                    tracing::warn!(error = %e, "skipping a trust bundle certificate");
                }
            }
            Err(e) => tracing::warn!(error = %e, "skipping unreadable trust bundle PEM"),
        }
    }
    // IoT Hub presents a public chain; a self-hosted hub one from the bundle.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    Ok(match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| anyhow::anyhow!("identity_cert and identity_pk do not match: {e}"))?,
    })
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Modules created or updated in the cloud.
    pub written: Vec<String>,
    /// Modules deleted in the cloud.
    pub deleted: Vec<String>,
}

impl CloudIdentities {
    /// A client for `target`, reading and updating `store`.
    pub fn new(target: CloudTarget, store: IdentityStore) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls(&target.trust_pem, &target.credential)?)
            .user_agent(format!("verged/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()?;
        let base = if target.https_port == 443 {
            format!("https://{}", target.hub)
        } else {
            format!("https://{}:{}", target.hub, target.https_port)
        };
        Ok(Self {
            http,
            base,
            target,
            store,
        })
    }

    /// The device's SAS token; none for an X.509 device (its certificate
    /// authenticates it).
    fn token(&self) -> Option<String> {
        let DeviceCredential::SharedKey(key) = &self.target.credential else {
            return None;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        SasToken::sign(
            &format!("{}/devices/{}", self.target.hub, self.target.device_id),
            key,
            now + TOKEN_TTL_SECS,
            None,
        )
        .to_string()
        .into()
    }

    fn url(&self, module: Option<&str>) -> String {
        let d = url_encode(self.target.device_id.as_str());
        match module {
            None => format!(
                "{}/devices/{d}/modules?api-version={API_VERSION}",
                self.base
            ),
            Some(m) => format!(
                "{}/devices/{d}/modules/{}?api-version={API_VERSION}",
                self.base,
                url_encode(m)
            ),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        module: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut req = self.http.request(method.clone(), self.url(module));
        if let Some(token) = self.token() {
            req = req.header("Authorization", token);
        }
        if let Some(b) = body {
            req = req
                .header("If-Match", "\"*\"")
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req.send().await.map_err(|e| {
            // reqwest's Display hides the cause (refused, TLS, DNS).
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            anyhow::anyhow!("{method} {}: {msg}", self.base)
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?.to_vec();
        Ok((status, bytes))
    }

    /// One reconcile pass (see the module docs).
    pub async fn sync_once(&self) -> anyhow::Result<PassReport> {
        let (status, body) = self.send(reqwest::Method::GET, None, None).await?;
        if status != 200 {
            anyhow::bail!(
                "listing the modules of {} answered {status}: {}",
                self.target.device_id,
                String::from_utf8_lossy(&body)
            );
        }
        let list: Vec<Value> = serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("the module list is not a JSON array: {e}"))?;
        let in_cloud: HashMap<String, Value> = list
            .into_iter()
            .filter_map(|m| Some((m.get("moduleId")?.as_str()?.to_owned(), m)))
            .collect();
        let mut report = PassReport::default();
        for identity in self.store.list().await {
            let key = self.store.module_key(&identity)?.to_base64();
            let up_to_date = in_cloud.get(&identity.module_id).is_some_and(|m| {
                let k = &m["authentication"]["symmetricKey"];
                k["primaryKey"] == key.as_str()
                    && k["secondaryKey"] == key.as_str()
                    && m["managedBy"] == identity.managed_by.as_str()
            });
            if up_to_date {
                continue;
            }
            let body = json!({
                "moduleId": identity.module_id,
                "deviceId": self.target.device_id.as_str(),
                "managedBy": identity.managed_by,
                "authentication": {
                    "type": "sas",
                    "symmetricKey": { "primaryKey": key, "secondaryKey": key },
                },
            });
            let (status, resp) = self
                .send(reqwest::Method::PUT, Some(&identity.module_id), Some(&body))
                .await?;
            if !(200..300).contains(&status) {
                anyhow::bail!(
                    "registering module {} answered {status}: {}",
                    identity.module_id,
                    String::from_utf8_lossy(&resp)
                );
            }
            tracing::info!(module = %identity.module_id, "module identity registered in the cloud");
            report.written.push(identity.module_id);
        }
        let mut done: Vec<Tombstone> = Vec::new();
        let mut failure = None;
        for t in self.store.deleted().await {
            if in_cloud.contains_key(&t.module_id) {
                match self
                    .send(reqwest::Method::DELETE, Some(&t.module_id), None)
                    .await
                {
                    Ok((s, _)) if (200..300).contains(&s) || s == 404 => {
                        tracing::info!(module = %t.module_id, "module identity deleted in the cloud");
                        report.deleted.push(t.module_id.clone());
                    }
                    Ok((s, resp)) => {
                        failure = Some(anyhow::anyhow!(
                            "deleting module {} answered {s}: {}",
                            t.module_id,
                            String::from_utf8_lossy(&resp)
                        ));
                        break;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            done.push(t);
        }
        // Record what was done even when a later deletion failed.
        self.store.forget_deleted(&done).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Runs passes until `stop` is cancelled (see the module docs).
    pub async fn run(self, stop: verge_shutdown::CancellationToken) {
        let mut changes = self.store.subscribe();
        let mut online: Option<bool> = None;
        let mut delay = RETRY_START;
        loop {
            changes.borrow_and_update();
            // A pass may wait on an unreachable hub (up to the timeouts):
            // shutdown does not wait for it. Cancelling is safe, every
            // store write is atomic and the next start reconciles again.
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.sync_once() => r,
            };
            let wait = match result {
                Ok(report) => {
                    if online != Some(true) {
                        tracing::info!(
                            hub = %self.base,
                            written = report.written.len(),
                            deleted = report.deleted.len(),
                            "module identities are registered in the cloud (online)"
                        );
                    }
                    online = Some(true);
                    delay = RETRY_START;
                    None
                }
                Err(e) => {
                    if online != Some(false) {
                        tracing::warn!(hub = %self.base, error = %format!("{e:#}"),
                            "cannot register module identities in the cloud (offline); retrying in the background");
                    } else {
                        tracing::debug!(error = %format!("{e:#}"), "module identity registration failed again");
                    }
                    online = Some(false);
                    let d = delay;
                    delay = (delay * 2).min(RETRY_MAX);
                    Some(d)
                }
            };
            let retry = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                () = retry => {}
            }
        }
    }
}
