//! Provisioning through a Device Provisioning Service (`[provisioning]
//! source = "dps"`), over DPS's HTTPS protocol as aziot-identityd speaks it:
//! `PUT {global_endpoint}/{idScope}/registrations/{registrationId}/register`
//! (202 with an `operationId`), then `GET …/operations/{operationId}` until
//! `assigned` or `failed`, authenticated by a SAS token over
//! `{idScope}/registrations/{registrationId}` signed with the attestation's
//! symmetric key, or (X.509 attestation) by the device's certificate in the
//! TLS handshake and no token; the device then uses the same credential at
//! its hub.
//!
//! The assignment (hub and device id) is cached in
//! `<homedir>/dps/assignment.json` (atomic write): verged registers once,
//! later starts read the cache and need no network (an offline start works),
//! and `verge system reprovision` registers again (the new assignment
//! replaces the cached one only once DPS answered). The cache
//! is used only while the endpoint, scope and registration id it was made
//! for are still the configured ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::sas::{SasToken, url_encode};

use crate::config::{DeviceCredential, DpsBoot, DpsSettings};

/// DPS's device API version (what aziot-identityd sends).
const API_VERSION: &str = "2021-06-01";
/// Lifetime of the tokens verged signs for DPS.
const TOKEN_TTL_SECS: u64 = 300;
/// Polls before a registration is given up (each waits `retry-after`).
const MAX_POLLS: usize = 30;
/// Longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// First delay between failed registrations at start-up (doubles to 60 s).
const RETRY_START: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What DPS assigned, as cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The hub to connect to.
    pub assigned_hub: String,
    /// The device id there.
    pub device_id: String,
    /// What it was registered with (the cache is valid for these only).
    pub global_endpoint: String,
    /// ID scope.
    pub id_scope: String,
    /// Registration id.
    pub registration_id: String,
}

fn cache_path(homedir: &Path) -> PathBuf {
    homedir.join("dps").join("assignment.json")
}

/// The cached assignment for `settings`, if any (blocking). A cache made for
/// other settings counts as none.
pub fn read_cache(homedir: &Path, settings: &DpsSettings) -> std::io::Result<Option<Assignment>> {
    let a: Option<Assignment> = verge_files::load_json(&cache_path(homedir))?;
    Ok(a.filter(|a| {
        a.global_endpoint == settings.global_endpoint
            && a.id_scope == settings.id_scope
            && a.registration_id == settings.registration_id
    }))
}

fn write_cache(homedir: &Path, a: &Assignment) -> std::io::Result<()> {
    let path = cache_path(homedir);
    if let Some(dir) = path.parent() {
        verge_files::create_private_dir(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(a).map_err(std::io::Error::other)?;
    verge_files::write_atomic(&path, &bytes)
}

/// Forgets the cached assignment (blocking), so the next start registers.
pub fn forget(homedir: &Path) -> std::io::Result<()> {
    match verge_files::remove_durable(&cache_path(homedir)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn client(boot: &DpsBoot) -> anyhow::Result<reqwest::Client> {
    let pem = match &boot.trust_bundle_cert {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("trust_bundle_cert {}", p.display()))?,
        None => String::new(),
    };
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(crate::cloud_identities::client_tls(
            &pem,
            &boot.settings.attestation,
        )?)
        .user_agent(format!("verged/{}", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// The SAS token of a symmetric-key attestation; none for X.509.
fn token(s: &DpsSettings) -> Option<String> {
    let DeviceCredential::SharedKey(key) = &s.attestation else {
        return None;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // aziot lowercases the audience; DPS compares it case-insensitively.
    let sr = format!("{}/registrations/{}", s.id_scope, s.registration_id).to_lowercase();
    let t = SasToken::sign(&sr, key, now + TOKEN_TTL_SECS, Some("registration"));
    Some(t.to_string())
}

/// `r` with the registration's `Authorization`, if it has a token.
fn authorized(r: reqwest::RequestBuilder, s: &DpsSettings) -> reqwest::RequestBuilder {
    match token(s) {
        Some(t) => r.header("Authorization", t),
        None => r,
    }
}

fn retry_after(r: &reqwest::Response) -> Duration {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs)
        .min(MAX_RETRY_AFTER)
}

/// Registers once: register, poll until assigned or failed.
pub async fn register(boot: &DpsBoot) -> anyhow::Result<Assignment> {
    let s = &boot.settings;
    let http = client(boot)?;
    let base = format!(
        "{}/{}/registrations/{}",
        s.global_endpoint,
        url_encode(&s.id_scope),
        url_encode(&s.registration_id)
    );
    let r = authorized(
        http.put(format!("{base}/register?api-version={API_VERSION}")),
        s,
    )
    .header("Content-Type", "application/json; charset=utf-8")
    .header("Accept", "application/json")
    .body(json!({"registrationId": s.registration_id}).to_string())
    .send()
    .await
    .with_context(|| format!("DPS {}", s.global_endpoint))?;
    let status = r.status();
    let mut wait = retry_after(&r);
    let body = json_of(r).await.context("DPS register answer")?;
    if status.as_u16() != 202 && status.as_u16() != 200 {
        bail!(
            "DPS refused the registration ({status}): {}",
            error_text(&body)
        );
    }
    let mut answer = body;
    for _ in 0..MAX_POLLS {
        match answer["status"].as_str() {
            Some("assigned") => return assignment(boot, &answer),
            Some("failed") => bail!(
                "DPS registration failed: {}",
                error_text(&answer["registrationState"])
            ),
            Some("assigning" | "unassigned") => {}
            other => bail!("DPS answered an unknown status {other:?}"),
        }
        let op = answer["operationId"]
            .as_str()
            .context("DPS answer without operationId")?
            .to_owned();
        tokio::time::sleep(wait).await;
        let r = authorized(
            http.get(format!(
                "{base}/operations/{}?api-version={API_VERSION}",
                url_encode(&op)
            )),
            s,
        )
        .header("Accept", "application/json")
        .send()
        .await
        .context("DPS operation status")?;
        let status = r.status();
        wait = retry_after(&r);
        let body = json_of(r).await.context("DPS operation status answer")?;
        if !status.is_success() {
            bail!(
                "DPS operation status refused ({status}): {}",
                error_text(&body)
            );
        }
        answer = body;
    }
    bail!("DPS did not assign within {MAX_POLLS} polls")
}

async fn json_of(r: reqwest::Response) -> anyhow::Result<Value> {
    let bytes = r.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn error_text(v: &Value) -> String {
    ["errorMessage", "message"]
        .iter()
        .find_map(|k| v[k].as_str())
        .map_or_else(|| v.to_string(), str::to_owned)
}

fn assignment(boot: &DpsBoot, answer: &Value) -> anyhow::Result<Assignment> {
    let st = &answer["registrationState"];
    let field = |k: &str| {
        st[k]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("DPS assignment without registrationState.{k}"))
    };
    Ok(Assignment {
        assigned_hub: field("assignedHub")?,
        device_id: field("deviceId")?,
        global_endpoint: boot.settings.global_endpoint.clone(),
        id_scope: boot.settings.id_scope.clone(),
        registration_id: boot.settings.registration_id.clone(),
    })
}

/// `d` scaled by a random factor in [0.5, 1): a fleet that lost its DPS
/// together does not come back in lockstep.
fn jitter(d: Duration) -> Duration {
    let r = uuid::Uuid::new_v4().as_bytes()[0];
    d.mul_f64(0.5 + f64::from(r) / 512.0)
}

/// Registers (unless an assignment for these settings is cached and not
/// `force`), retrying with back-off until it succeeds or `stop` resolves;
/// the assignment is cached. `Ok(false)`: stopped first.
pub async fn ensure(
    boot: &DpsBoot,
    force: bool,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<bool> {
    let b = Arc::new(boot.clone());
    // Forced (`verge system reprovision`), the cache stays until a new
    // assignment replaces it: a DPS that cannot be reached meanwhile must
    // not cost the next start its identity.
    if !force {
        let b2 = b.clone();
        let cached =
            tokio::task::spawn_blocking(move || read_cache(&b2.homedir, &b2.settings)).await??;
        if let Some(a) = cached {
            tracing::info!(hub = %a.assigned_hub, device = %a.device_id, "DPS assignment from the cache");
            return Ok(true);
        }
    }
    tokio::pin!(stop);
    let mut delay = RETRY_START;
    loop {
        tracing::info!(endpoint = %b.settings.global_endpoint, scope = %b.settings.id_scope,
            registration = %b.settings.registration_id, "registering with DPS");
        match register(&b).await {
            Ok(a) => {
                let home = b.homedir.clone();
                let cached = a.clone();
                tokio::task::spawn_blocking(move || write_cache(&home, &cached))
                    .await?
                    .context("caching the DPS assignment")?;
                tracing::info!(hub = %a.assigned_hub, device = %a.device_id, "provisioned by DPS");
                return Ok(true);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "DPS registration failed");
            }
        }
        tokio::select! {
            () = &mut stop => return Ok(false),
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}
