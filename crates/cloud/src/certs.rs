//! CA certificates for `certificateAuthority` devices: IoT Hub's
//! certificates resource (what the portal and `az iot hub certificate`
//! drive through Azure Resource Manager), served here under the service API
//! with the same JSON shapes, authorized by the shared access policy:
//!
//! | request | effect |
//! |---|---|
//! | `PUT /certificates/{name}` `{"properties":{"certificate":PEM or base64 DER,"isVerified":bool?}}` | upload (201, or 200 replacing with a matching `If-Match`) |
//! | `GET /certificates`, `GET /certificates/{name}` | `{"value":[…]}` / one description |
//! | `POST /certificates/{name}/generateVerificationCode` | a fresh code in `properties.verificationCode` |
//! | `POST /certificates/{name}/verify` `{"certificate":PEM}` | proof of possession: a certificate with CN = the code, signed by the CA's key, marks it verified |
//! | `DELETE /certificates/{name}` | removes it |
//!
//! Only verified certificates are trusted by the device endpoint (as in IoT
//! Hub, `isVerified: true` at upload skips the proof). Stored in the
//! database's `certificates` keyspace (name → [`CaCert`] JSON), loaded at
//! start and written through with an fsync.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::time::Timestamp;
use verge_x509::CertificateDer;

use crate::error::{CloudError, Result};
use crate::registry::{etag_of, if_match};

/// One uploaded CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaCert {
    /// The resource name.
    pub name: String,
    /// PEM text as uploaded (one certificate).
    pub pem: String,
    /// Proof of possession done (or skipped at upload).
    pub is_verified: bool,
    /// The code the last `generateVerificationCode` issued.
    pub verification_code: Option<String>,
    /// Created (ms).
    pub created_ms: i64,
    /// Last change (ms).
    pub updated_ms: i64,
    /// Bumped on every change; the etag is derived from it.
    pub etag_version: u64,
}

impl CaCert {
    fn der(&self) -> Option<CertificateDer<'static>> {
        verge_x509::parse_certs(&self.pem).ok()?.into_iter().next()
    }

    /// ARM's certificate description.
    pub fn to_json(&self, with_code: bool) -> Value {
        let der = self.der();
        let (subject, expiry, thumbprint) = der
            .as_ref()
            .map(|d| {
                let cn = verge_x509::common_name(d).unwrap_or_default();
                let expiry = verge_x509::validity(d).map(|(_, to)| to).unwrap_or(0);
                (cn, expiry, verge_x509::thumbprints(d).1)
            })
            .unwrap_or_default();
        let iso = |ms: i64| Timestamp::from_millis(ms).to_iso8601();
        let mut props = json!({
            "subject": subject,
            "expiry": iso(expiry.saturating_mul(1000)),
            "thumbprint": thumbprint,
            "isVerified": self.is_verified,
            "created": iso(self.created_ms),
            "updated": iso(self.updated_ms),
            "certificate": self.pem,
        });
        if with_code {
            props["verificationCode"] = json!(self.verification_code);
        }
        json!({
            "properties": props,
            "id": format!("/certificates/{}", self.name),
            "name": self.name,
            "type": "Microsoft.Devices/IotHubs/Certificates",
            "etag": etag_of(self.etag_version),
        })
    }
}

/// The uploaded CA certificates, in memory and in the database.
pub struct CaStore {
    db: fjall::Database,
    ks: fjall::Keyspace,
    /// Serializes writers (read, check, commit, apply).
    writer: Mutex<()>,
    map: Mutex<BTreeMap<String, CaCert>>,
    /// The verified ones as DER, what device authentication reads.
    trusted: RwLock<Arc<Vec<CertificateDer<'static>>>>,
}

impl std::fmt::Debug for CaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaStore").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    Timestamp::now().as_millis()
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(CloudError::BadRequest(format!(
            "certificate name {name:?}: 1..64 of letters, digits, '-', '_', '.'"
        )))
    }
}

impl CaStore {
    /// Opens the `certificates` keyspace of `db` and loads it. Blocking.
    pub(crate) fn open(db: &fjall::Database) -> Result<Self> {
        let ks = db.keyspace("certificates", fjall::KeyspaceCreateOptions::default)?;
        let mut map = BTreeMap::new();
        for kv in ks.iter() {
            let (_, v) = kv.into_inner()?;
            let c: CaCert = serde_json::from_slice(&v)
                .map_err(|e| CloudError::Storage(format!("certificate record: {e}")))?;
            map.insert(c.name.clone(), c);
        }
        let store = Self {
            db: db.clone(),
            ks,
            writer: Mutex::new(()),
            map: Mutex::new(BTreeMap::new()),
            trusted: RwLock::new(Arc::default()),
        };
        store.apply(map);
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CaCert>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, map: BTreeMap<String, CaCert>) {
        let trusted: Vec<_> = map
            .values()
            .filter(|c| c.is_verified)
            .filter_map(CaCert::der)
            .collect();
        *self.trusted.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(trusted);
        *self.lock() = map;
    }

    /// The verified CA certificates.
    pub fn trusted(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.trusted
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// All, by name.
    pub fn list(&self) -> Vec<CaCert> {
        self.lock().values().cloned().collect()
    }

    /// One.
    pub fn get(&self, name: &str) -> Result<CaCert> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| CloudError::NotFound(format!("no certificate {name:?}")))
    }

    /// Writes `c` (or deletes `name` with `None`) durably, then in memory.
    /// Blocking (fsync): called from the blocking pool.
    fn commit(&self, name: &str, c: Option<CaCert>) -> Result<()> {
        let mut map = self.lock().clone();
        let mut batch = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        match &c {
            Some(c) => {
                let bytes = serde_json::to_vec(c)
                    .map_err(|e| CloudError::Storage(format!("certificate record: {e}")))?;
                batch.insert(&self.ks, name.as_bytes(), bytes);
                map.insert(name.to_owned(), c.clone());
            }
            None => {
                batch.remove(&self.ks, name.as_bytes());
                map.remove(name);
            }
        }
        batch.commit()?;
        self.apply(map);
        Ok(())
    }

    fn matches(existing: Option<&CaCert>, if_match_hdr: Option<&str>) -> Result<()> {
        if let (Some(e), Some(h)) = (existing, if_match_hdr)
            && !if_match(h, &etag_of(e.etag_version))
        {
            return Err(CloudError::PreconditionFailed(format!(
                "etag {h} does not match certificate {:?}",
                e.name
            )));
        }
        Ok(())
    }

    /// Upload (or replace). Returns the record and whether it was created.
    pub fn put(
        &self,
        name: &str,
        body: &Value,
        if_match_hdr: Option<&str>,
    ) -> Result<(CaCert, bool)> {
        check_name(name)?;
        let props = body.get("properties").unwrap_or(body);
        let text = props
            .get("certificate")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CloudError::BadRequest("properties.certificate (PEM) is required".into())
            })?;
        let certs = verge_x509::parse_certs(text).map_err(CloudError::BadRequest)?;
        let [der] = certs.as_slice() else {
            return Err(CloudError::BadRequest(
                "properties.certificate must hold exactly one certificate".into(),
            ));
        };
        let is_ca = verge_x509::is_ca(der).map_err(|e| CloudError::BadRequest(e.to_string()))?;
        if !is_ca {
            return Err(CloudError::BadRequest(
                "the certificate is not a CA certificate (basicConstraints CA=true)".into(),
            ));
        }
        let pem = pem_of(der);
        let _guard = self.writer();
        let existing = self.lock().get(name).cloned();
        if existing.is_some() && if_match_hdr.is_none() {
            return Err(CloudError::Conflict(format!(
                "certificate {name:?} exists (send If-Match to replace it)"
            )));
        }
        Self::matches(existing.as_ref(), if_match_hdr)?;
        let t = now_ms();
        let rec = CaCert {
            name: name.to_owned(),
            pem,
            is_verified: props.get("isVerified").and_then(Value::as_bool) == Some(true),
            verification_code: None,
            created_ms: existing.as_ref().map_or(t, |e| e.created_ms),
            updated_ms: t,
            etag_version: existing.as_ref().map_or(1, |e| e.etag_version + 1),
        };
        self.commit(name, Some(rec.clone()))?;
        Ok((rec, existing.is_none()))
    }

    /// Issues a fresh verification code.
    pub fn generate_code(&self, name: &str, if_match_hdr: Option<&str>) -> Result<CaCert> {
        let _guard = self.writer();
        let mut rec = self.get(name)?;
        Self::matches(Some(&rec), if_match_hdr)?;
        // Random and hard to guess: proof must come from the CA's key now.
        rec.verification_code = Some(
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .to_ascii_uppercase(),
        );
        rec.updated_ms = now_ms();
        rec.etag_version += 1;
        self.commit(name, Some(rec.clone()))?;
        Ok(rec)
    }

    /// Proof of possession: `body.certificate` has CN = the issued code and
    /// is signed by the CA's key.
    pub fn verify(&self, name: &str, body: &Value, if_match_hdr: Option<&str>) -> Result<CaCert> {
        let _guard = self.writer();
        let mut rec = self.get(name)?;
        Self::matches(Some(&rec), if_match_hdr)?;
        let code = rec.verification_code.clone().ok_or_else(|| {
            CloudError::BadRequest(format!(
                "no verification code issued for {name:?} (generateVerificationCode first)"
            ))
        })?;
        let text = body
            .get("certificate")
            .and_then(Value::as_str)
            .ok_or_else(|| CloudError::BadRequest("certificate (PEM) is required".into()))?;
        let proof = verge_x509::parse_certs(text).map_err(CloudError::BadRequest)?;
        let ca = rec
            .der()
            .ok_or_else(|| CloudError::Storage("stored certificate unreadable".into()))?;
        let proof = proof
            .first()
            .ok_or_else(|| CloudError::BadRequest("no certificate".into()))?;
        verge_x509::verify_proof_of_possession(&ca, proof, &code)
            .map_err(|e| CloudError::BadRequest(e.to_string()))?;
        rec.is_verified = true;
        rec.verification_code = None;
        rec.updated_ms = now_ms();
        rec.etag_version += 1;
        self.commit(name, Some(rec.clone()))?;
        tracing::info!(certificate = %name, "CA certificate verified by proof of possession");
        Ok(rec)
    }

    /// Removes one.
    pub fn delete(&self, name: &str, if_match_hdr: Option<&str>) -> Result<()> {
        let _guard = self.writer();
        let rec = self.get(name)?;
        Self::matches(Some(&rec), if_match_hdr)?;
        self.commit(name, None)
    }

    /// Holds writers one at a time across read-check-commit.
    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
