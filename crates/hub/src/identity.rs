//! Edge-environment mode: the hub as verged's `edgeHub` module takes its
//! module identities and its TLS server certificate from verged's workload
//! API, and keeps both on disk so it restarts while verged is away.
//!
//! * Module identities: `GET /modules/$edgeHub/identities` (a Verge
//!   extension served on the hub's socket only) at startup, every
//!   `workload.identities_refresh_secs`, and after a token for an unknown
//!   identity or with a wrong signature (the first such refresh at once,
//!   later ones at most every `workload.identities_miss_secs`). Each answer replaces the module part
//!   of the [`SasAuthenticator`]'s key table and `module-identities.json`
//!   under `storage_dir` (mode 0600: it holds keys). A failed fetch keeps
//!   the last known identities.
//! * Server certificate: `POST …/certificate/server` for the gateway
//!   hostname (commonName and SAN), served through a [`SwappableCert`]:
//!   renewed at 80% of its lifetime without a restart, retried with
//!   back-off (1 s doubling up to `workload.cert_retry_max_secs`) while the
//!   old one keeps being served; kept in `server-cert.json` (0600: it holds
//!   the private key) so a restart without verged still has a certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use verge_core::time::Timestamp;
use verge_core::{ClientId, DeviceId, ModuleId, SharedAccessKey};
use verge_workload::api::HubModuleIdentity;
use verge_workload::client::{WorkloadClient, socket_path_from_uri};

use crate::HubState;
use crate::auth::{IdentityKeys, KeyTable, MissPacer, SasAuthenticator};
use crate::tls::{SwappableCert, certified_key};

/// Fraction of a server certificate's lifetime after which it is renewed.
pub const RENEW_AT: f64 = 0.8;
/// How long startup waits for verged before falling back to the caches.
const STARTUP_WAIT: Duration = Duration::from_secs(5);

/// The module environment verged gives the hub (reference §7.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeEnv {
    /// The hub's own workload socket (`IOTEDGE_WORKLOADURI`).
    pub workload_socket: PathBuf,
    /// `IOTEDGE_MODULEID` (`$edgeHub`).
    pub module_id: String,
    /// `IOTEDGE_MODULEGENERATIONID`.
    pub generation_id: String,
    /// `IOTEDGE_DEVICEID`.
    pub device_id: String,
    /// `IOTEDGE_IOTHUBHOSTNAME`.
    pub iothub_hostname: String,
    /// The name clients dial, the certificate's name: `EdgeDeviceHostName`
    /// (what verged gives edgeHub), else `IOTEDGE_GATEWAYHOSTNAME`.
    pub gateway_hostname: String,
}

impl EdgeEnv {
    /// From the process environment; `Ok(None)` when `IOTEDGE_WORKLOADURI`
    /// is not set (not run by verged).
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Same, from any lookup (tests). The error names what is missing.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let Some(uri) = get("IOTEDGE_WORKLOADURI") else {
            return Ok(None);
        };
        let workload_socket = socket_path_from_uri(&uri)
            .ok_or_else(|| format!("IOTEDGE_WORKLOADURI {uri:?} is not a unix:// URI"))?;
        let mut missing = Vec::new();
        let mut need = |k: &'static str| {
            get(k).unwrap_or_else(|| {
                missing.push(k);
                String::new()
            })
        };
        let module_id = need("IOTEDGE_MODULEID");
        let generation_id = need("IOTEDGE_MODULEGENERATIONID");
        let device_id = need("IOTEDGE_DEVICEID");
        let iothub_hostname = need("IOTEDGE_IOTHUBHOSTNAME");
        let gateway_hostname = get("EdgeDeviceHostName")
            .or_else(|| get("IOTEDGE_GATEWAYHOSTNAME"))
            .unwrap_or_else(|| {
                missing.push("EdgeDeviceHostName or IOTEDGE_GATEWAYHOSTNAME");
                String::new()
            });
        if !missing.is_empty() {
            return Err(format!(
                "IOTEDGE_WORKLOADURI is set but {} missing",
                missing.join(", ")
            ));
        }
        Ok(Some(Self {
            workload_socket,
            module_id,
            generation_id,
            device_id,
            iothub_hostname,
            gateway_hostname,
        }))
    }

    /// A workload client acting as the hub module.
    pub fn workload(&self) -> WorkloadClient {
        WorkloadClient::new(&self.workload_socket, &self.module_id, &self.generation_id)
    }
}

/// A background task of the hub.
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Writes `bytes` to `path` through a temporary file with mode 0600 (the
/// caches hold keys), fsynced and renamed, so a crash leaves the old or the
/// new file, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    verge_files::write_atomic(path, bytes)
}

/// Module identities → key table entries (bad entries are skipped and logged).
fn module_table(device: &DeviceId, list: &[HubModuleIdentity]) -> KeyTable {
    let mut table = KeyTable::new();
    for i in list {
        let module = match ModuleId::new(i.module_id.as_str()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(module = %i.module_id, error = %e, "skipping a module identity");
                continue;
            }
        };
        match SharedAccessKey::from_base64(&i.key) {
            Ok(key) => {
                table.insert(
                    ClientId::module(device.clone(), module),
                    IdentityKeys::single(key),
                );
            }
            Err(e) => {
                tracing::warn!(module = %i.module_id, error = %e.reason, "skipping a module identity with a bad key");
            }
        }
    }
    table
}

struct ModuleSource {
    client: WorkloadClient,
    device: DeviceId,
    cache: PathBuf,
    auth: Arc<SasAuthenticator>,
}

impl ModuleSource {
    async fn load_cache(&self) -> bool {
        let bytes = match tokio::fs::read(&self.cache).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(file = %self.cache.display(), error = %e, "cannot read the module identity cache");
                return false;
            }
        };
        match serde_json::from_slice::<Vec<HubModuleIdentity>>(&bytes) {
            Ok(list) => {
                self.auth.set_modules(module_table(&self.device, &list));
                tracing::info!(
                    count = list.len(),
                    "module identities loaded from the cache"
                );
                true
            }
            Err(e) => {
                tracing::warn!(file = %self.cache.display(), error = %e, "ignoring a corrupt module identity cache");
                false
            }
        }
    }

    async fn refresh(&self) -> anyhow::Result<usize> {
        let list = self.client.hub_identities().await?;
        // Cache first, so what is in force is on disk for the next start.
        let bytes = serde_json::to_vec(&list)?;
        let path = self.cache.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || write_private(&path, &bytes)).await? {
            tracing::warn!(file = %self.cache.display(), error = %e, "cannot cache the module identities");
        }
        self.auth.set_modules(module_table(&self.device, &list));
        Ok(list.len())
    }

    /// Periodic refresh, plus early ones after an authentication miss: the
    /// first at once (a module deployed just after the hub started is let in
    /// on its first try), later ones at least `miss_min` apart.
    async fn run(self, every: Duration, miss_min: Duration) {
        let mut last = tokio::time::Instant::now();
        let mut pacer = MissPacer::new(miss_min);
        let mut misses = self.auth.misses();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(last + every) => {}
                Ok(()) = misses.changed() => pacer.wait().await,
            }
            misses.mark_unchanged();
            last = tokio::time::Instant::now();
            match self.refresh().await {
                Ok(n) => tracing::debug!(count = n, "module identities refreshed"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the module identities; keeping the last known")
                }
            }
        }
    }
}

/// A server certificate as obtained (and cached).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertRecord {
    certificate: String,
    private_key: String,
    /// notAfter, ms since the epoch.
    expires_ms: i64,
    /// When it was obtained, ms since the epoch (the start of its lifetime here).
    obtained_ms: i64,
}

impl CertRecord {
    fn renew_at_ms(&self) -> i64 {
        let life = (self.expires_ms - self.obtained_ms).max(0);
        // f64 is exact for any realistic lifetime in milliseconds.
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        let used = (life as f64 * RENEW_AT) as i64;
        self.obtained_ms + used
    }
}

struct CertSource {
    client: WorkloadClient,
    common_name: String,
    cache: PathBuf,
    retry_max: Duration,
}

impl CertSource {
    async fn fetch(&self) -> anyhow::Result<(CertRecord, rustls::sign::CertifiedKey)> {
        let obtained_ms = Timestamp::now().as_millis();
        let r = self.client.server_certificate(&self.common_name).await?;
        let expires_ms = Timestamp::parse(&r.expiration)
            .context("the certificate's expiration")?
            .as_millis();
        let rec = CertRecord {
            certificate: r.certificate,
            private_key: r.private_key.bytes,
            expires_ms,
            obtained_ms,
        };
        let ck = certified_key(&rec.certificate, &rec.private_key)?;
        let bytes = serde_json::to_vec(&rec)?;
        let path = self.cache.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || write_private(&path, &bytes)).await? {
            // Serving works without the cache; only an offline restart needs it.
            tracing::warn!(file = %self.cache.display(), error = %e, "cannot cache the server certificate");
        }
        Ok((rec, ck))
    }

    async fn load_cache(&self) -> anyhow::Result<(CertRecord, rustls::sign::CertifiedKey)> {
        let bytes = tokio::fs::read(&self.cache)
            .await
            .with_context(|| format!("reading {}", self.cache.display()))?;
        let rec: CertRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", self.cache.display()))?;
        if rec.expires_ms <= Timestamp::now().as_millis() {
            anyhow::bail!("the cached server certificate has expired");
        }
        let ck = certified_key(&rec.certificate, &rec.private_key)?;
        Ok((rec, ck))
    }

    /// Renews at [`RENEW_AT`] of each certificate's lifetime, forever.
    async fn run(self, certs: Arc<SwappableCert>, mut current: CertRecord) {
        loop {
            let wait_ms = (current.renew_at_ms() - Timestamp::now().as_millis()).max(1000);
            tokio::time::sleep(Duration::from_millis(
                u64::try_from(wait_ms).unwrap_or(1000),
            ))
            .await;
            let mut backoff = Duration::from_secs(1);
            current = loop {
                match self.fetch().await {
                    Ok((rec, ck)) => {
                        certs.set(ck);
                        tracing::info!(
                            expires = %Timestamp::from_millis(rec.expires_ms).to_iso8601(),
                            "server certificate renewed"
                        );
                        break rec;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "server certificate renewal failed; serving the old one");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.retry_max);
                    }
                }
            };
        }
    }
}

/// Sets up the edge-environment sources the configuration asks for: loads
/// the caches, asks verged once (briefly), and returns the TLS acceptor
/// (when the certificate comes from verged) and the refresh tasks.
pub async fn prepare(
    state: &Arc<HubState>,
) -> anyhow::Result<(Option<tokio_rustls::TlsAcceptor>, Vec<Task>)> {
    let cfg = &state.cfg;
    let Some(env) = &cfg.edge else {
        return Ok((None, Vec::new()));
    };
    let mut tasks: Vec<Task> = Vec::new();
    if cfg.device_key.is_empty() {
        let src = ModuleSource {
            client: env.workload(),
            device: DeviceId::new(cfg.device_id.as_str())?,
            cache: cfg.storage_dir.join("module-identities.json"),
            auth: state.sas.clone(),
        };
        let cached = src.load_cache().await;
        match tokio::time::timeout(STARTUP_WAIT, src.refresh()).await {
            Ok(Ok(n)) => tracing::info!(count = n, "module identities fetched from verged"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, cached, "cannot fetch module identities; using the cache")
            }
            Err(_) => tracing::warn!(cached, "verged did not answer; using the cache"),
        }
        let w = &cfg.workload;
        tasks.push(Box::pin(src.run(
            Duration::from_secs(w.identities_refresh_secs),
            Duration::from_secs(w.identities_miss_secs),
        )));
    }
    let acceptor = if cfg.tls.is_none() {
        let src = CertSource {
            client: env.workload(),
            common_name: env.gateway_hostname.clone(),
            cache: cfg.storage_dir.join("server-cert.json"),
            retry_max: Duration::from_secs(cfg.workload.cert_retry_max_secs),
        };
        let (rec, ck) = match tokio::time::timeout(STARTUP_WAIT, src.fetch()).await {
            Ok(Ok(got)) => got,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_owned(),
                };
                let got = src.load_cache().await.with_context(|| {
                    format!("no server certificate: verged: {why}; and the cache")
                })?;
                tracing::warn!(error = %why, "cannot get a server certificate from verged; serving the cached one");
                got
            }
        };
        let certs = Arc::new(SwappableCert::new(ck));
        tasks.push(Box::pin(src.run(certs.clone(), rec)));
        Some(crate::tls::acceptor_with(certs)?)
    } else {
        None
    };
    Ok((acceptor, tasks))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]
    use super::*;

    #[test]
    fn environment() {
        let full = |k: &str| match k {
            "IOTEDGE_WORKLOADURI" => Some("unix:///h/mnt/edgeHub.sock".to_owned()),
            "EdgeDeviceHostName" => Some("edge1.local".to_owned()),
            "IOTEDGE_GATEWAYHOSTNAME" => Some("parent".to_owned()),
            other => Some(format!("v-{other}")),
        };
        let e = EdgeEnv::from_lookup(full).unwrap().unwrap();
        assert_eq!(e.workload_socket, Path::new("/h/mnt/edgeHub.sock"));
        assert_eq!(e.gateway_hostname, "edge1.local");
        assert_eq!(e.module_id, "v-IOTEDGE_MODULEID");
        assert_eq!(EdgeEnv::from_lookup(|_| None).unwrap(), None);
        let partial = |k: &str| (k == "IOTEDGE_WORKLOADURI").then(|| "unix:///s".to_owned());
        let err = EdgeEnv::from_lookup(partial).unwrap_err();
        assert!(err.contains("IOTEDGE_MODULEGENERATIONID"), "{err}");
        assert!(err.contains("EdgeDeviceHostName"), "{err}");
    }

    #[test]
    fn renews_at_eighty_percent() {
        let r = CertRecord {
            certificate: String::new(),
            private_key: String::new(),
            expires_ms: 11_000,
            obtained_ms: 1_000,
        };
        assert_eq!(r.renew_at_ms(), 9_000);
    }

    #[test]
    fn cache_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
