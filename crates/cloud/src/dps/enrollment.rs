//! Enrollments as DPS's service API shapes them (`IndividualEnrollment`,
//! `EnrollmentGroup`), validated on the way in.
//!
//! Only symmetric-key attestation is implemented; [`Attestation`] is an enum
//! so X.509 (leaf thumbprints, CA certificates) can be added beside it. An
//! `x509` or `tpm` attestation is refused with a 400 that says so, rather
//! than stored and never matched.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::SharedAccessKey;

use crate::CloudError;
use crate::registry::SymmetricKeys;

/// How a registration proves who it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Attestation {
    /// Shared keys (an individual enrollment's own keys, or a group's keys
    /// from which each device's key is derived).
    SymmetricKey {
        /// The two keys, base64.
        keys: SymmetricKeys,
    },
    /// X.509: an individual enrollment's device certificates (primary,
    /// secondary), matched by thumbprint; or a group's signing certificates
    /// (a root or intermediate CA), which a device's chain must reach. Kept
    /// as given (PEM, or base64 DER as DPS's API carries them).
    X509 {
        /// One or two certificates.
        certificates: Vec<String>,
    },
}

/// What DPS does when a device registers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-assign (and so re-apply the enrollment) on a new registration.
    pub update_hub_assignment: bool,
    /// Keep the device's twin (true) or reset it to the initial twin (false).
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    // DPS's default: re-assign and keep the data.
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// One enrollment, individual or group (the id lives in the map key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The attestation mechanism and its secrets.
    pub attestation: Attestation,
    /// Individual only: the device id to create (default: the registration id).
    pub device_id: Option<String>,
    /// The IoT hub host name devices are assigned to (default: the DPS's).
    pub iot_hub_host_name: Option<String>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// `initialTwin`: `{"tags": …, "properties": {"desired": …}}`.
    pub initial_twin: Option<Value>,
    /// `provisioningStatus == "disabled"`.
    pub disabled: bool,
    /// `reprovisionPolicy`.
    pub reprovision: ReprovisionPolicy,
    /// Returned to the device as `registrationState.payload` (a Verge
    /// stand-in for what DPS's custom allocation functions return).
    pub payload: Option<Value>,
    /// Bumped on every update; the etag is derived from it.
    pub version: u64,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Last updated, Unix ms.
    pub updated_ms: i64,
}

/// Registration ids: DPS allows lowercase alphanumerics and `-._:`, up to 128.
pub fn check_registration_id(id: &str) -> Result<(), CloudError> {
    if verge_core::id::is_registration_id(id) {
        Ok(())
    } else {
        Err(CloudError::BadRequest(format!(
            "registration id {id:?} must be 1-128 lowercase letters, digits or -._:"
        )))
    }
}

fn bad(m: impl Into<String>) -> CloudError {
    CloudError::BadRequest(m.into())
}

fn bool_field(
    o: &serde_json::Map<String, Value>,
    name: &str,
    default: bool,
) -> Result<bool, CloudError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(format!("{name} must be a boolean, got {other}"))),
    }
}

fn str_field(o: &serde_json::Map<String, Value>, name: &str) -> Result<Option<String>, CloudError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!("{name} must be a string, got {other}"))),
    }
}

fn key_field(sk: &serde_json::Map<String, Value>, name: &str) -> Result<String, CloudError> {
    match str_field(sk, name)? {
        // Absent keys are generated, as DPS does.
        None => Ok(SymmetricKeys::generate().primary),
        Some(k) => {
            SharedAccessKey::from_base64(&k)
                .map_err(|e| bad(format!("attestation.symmetricKey.{name}: {e}")))?;
            Ok(k)
        }
    }
}

/// Where an enrollment's X.509 certificates are: a device's own
/// (individual) or the CA certificates that sign devices (group).
fn x509_field(group: bool) -> &'static str {
    if group {
        "signingCertificates"
    } else {
        "clientCertificates"
    }
}

/// `attestation.x509`: `clientCertificates` (individual) or
/// `signingCertificates` (group), each `{primary, secondary}` with a
/// `certificate` (PEM or base64 DER) checked to be one.
fn x509_attestation(
    att: &serde_json::Map<String, Value>,
    group: bool,
) -> Result<Attestation, CloudError> {
    let x = att
        .get("x509")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("attestation.x509 must be an object"))?;
    let (field, wrong) = (x509_field(group), x509_field(!group));
    if x.get(wrong).is_some_and(|v| !v.is_null()) {
        return Err(bad(format!(
            "attestation.x509.{wrong} is for {}; this is {}",
            if group {
                "individual enrollments"
            } else {
                "enrollment groups"
            },
            if group {
                "a group"
            } else {
                "an individual enrollment"
            },
        )));
    }
    if x.get("caReferences").is_some_and(|v| !v.is_null()) {
        return Err(bad(format!(
            "attestation.x509.caReferences is not supported; give {field} with the CA certificate"
        )));
    }
    let slots = x.get(field).and_then(Value::as_object);
    let mut certificates = Vec::new();
    for slot in ["primary", "secondary"] {
        let Some(c) = slots.and_then(|s| s.get(slot)).filter(|v| !v.is_null()) else {
            continue;
        };
        let text = c
            .get("certificate")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                bad(format!(
                    "attestation.x509.{field}.{slot}.certificate is required"
                ))
            })?;
        let der = verge_x509::parse_certs(text)
            .map_err(|e| bad(format!("attestation.x509.{field}.{slot}.certificate: {e}")))?;
        if group
            && !der
                .first()
                .is_some_and(|d| verge_x509::is_ca(d).unwrap_or(false))
        {
            return Err(bad(format!(
                "attestation.x509.{field}.{slot}.certificate is not a CA certificate"
            )));
        }
        certificates.push(text.to_owned());
    }
    if certificates.is_empty() {
        return Err(bad(format!(
            "attestation.x509.{field}.primary.certificate is required"
        )));
    }
    Ok(Attestation::X509 { certificates })
}

impl Enrollment {
    /// The DER certificates of an X.509 enrollment (none for symmetric keys).
    pub fn x509_certificates(&self) -> Vec<verge_x509::CertificateDer<'static>> {
        match &self.attestation {
            Attestation::SymmetricKey { .. } => Vec::new(),
            Attestation::X509 { certificates } => certificates
                .iter()
                .filter_map(|c| verge_x509::parse_certs(c).ok()?.into_iter().next())
                .collect(),
        }
    }

    /// Reads a PUT body. `id_field` is `registrationId` or
    /// `enrollmentGroupId`, which must match `path_id` when present;
    /// `group` refuses `deviceId`. `previous` keeps the creation time.
    pub fn from_json(
        v: &Value,
        id_field: &str,
        path_id: &str,
        group: bool,
        previous: Option<&Enrollment>,
        now_ms: i64,
    ) -> Result<Self, CloudError> {
        let o = v
            .as_object()
            .ok_or_else(|| bad("the body must be a JSON object (an enrollment)"))?;
        if let Some(id) = str_field(o, id_field)?
            && id != path_id
        {
            return Err(bad(format!(
                "{id_field} {id:?} in the body does not match {path_id:?} in the path"
            )));
        }
        let att = o
            .get("attestation")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("attestation (an object with a type) is required"))?;
        let attestation = match att.get("type").and_then(Value::as_str) {
            Some("symmetricKey") => {
                let empty = serde_json::Map::new();
                let sk = match att.get("symmetricKey") {
                    None | Some(Value::Null) => &empty,
                    Some(Value::Object(m)) => m,
                    Some(_) => return Err(bad("attestation.symmetricKey must be an object")),
                };
                Attestation::SymmetricKey {
                    keys: SymmetricKeys {
                        primary: key_field(sk, "primaryKey")?,
                        secondary: key_field(sk, "secondaryKey")?,
                    },
                }
            }
            Some("x509") => x509_attestation(att, group)?,
            Some("tpm") => {
                return Err(bad(
                    "attestation type \"tpm\" is not supported by this service (symmetricKey or x509)",
                ));
            }
            other => {
                return Err(bad(format!(
                    "attestation.type must be \"symmetricKey\" or \"x509\", got {other:?}"
                )));
            }
        };
        let device_id = str_field(o, "deviceId")?;
        if group && device_id.is_some() {
            return Err(bad("an enrollment group has no deviceId"));
        }
        if let Some(d) = &device_id {
            verge_core::DeviceId::new(d).map_err(|e| bad(format!("deviceId: {e}")))?;
        }
        let iot_edge = match o.get("capabilities") {
            None | Some(Value::Null) => false,
            Some(Value::Object(c)) => bool_field(c, "iotEdge", false)?,
            Some(_) => return Err(bad("capabilities must be an object")),
        };
        let initial_twin = match o.get("initialTwin") {
            None | Some(Value::Null) => None,
            Some(t @ Value::Object(m)) => {
                for (k, v) in m {
                    match k.as_str() {
                        "tags" if v.is_object() || v.is_null() => {}
                        "properties"
                            if v.is_null()
                                || v.as_object().is_some_and(|p| {
                                    p.iter().all(|(n, d)| {
                                        n == "desired" && (d.is_object() || d.is_null())
                                    })
                                }) => {}
                        _ => {
                            return Err(bad(format!(
                                "initialTwin.{k} is not allowed: only tags and properties.desired (objects)"
                            )));
                        }
                    }
                }
                Some(t.clone())
            }
            Some(_) => return Err(bad("initialTwin must be an object")),
        };
        let disabled = match str_field(o, "provisioningStatus")?.as_deref() {
            None | Some("enabled") => false,
            Some("disabled") => true,
            Some(other) => {
                return Err(bad(format!(
                    "provisioningStatus must be \"enabled\" or \"disabled\", got {other:?}"
                )));
            }
        };
        let reprovision = match o.get("reprovisionPolicy") {
            None | Some(Value::Null) => ReprovisionPolicy::default(),
            Some(Value::Object(p)) => ReprovisionPolicy {
                update_hub_assignment: bool_field(p, "updateHubAssignment", true)?,
                migrate_device_data: bool_field(p, "migrateDeviceData", true)?,
            },
            Some(_) => return Err(bad("reprovisionPolicy must be an object")),
        };
        let iot_hub_host_name = str_field(o, "iotHubHostName")?;
        if let Some(h) = &iot_hub_host_name
            && (h.contains('/') || h.chars().any(char::is_whitespace))
        {
            return Err(bad(format!("iotHubHostName {h:?} is not a host name")));
        }
        let payload = match o.get("payload") {
            None | Some(Value::Null) => None,
            Some(p) => Some(p.clone()),
        };
        Ok(Self {
            attestation,
            device_id,
            iot_hub_host_name,
            iot_edge,
            initial_twin,
            disabled,
            reprovision,
            payload,
            version: previous.map_or(1, |p| p.version + 1),
            created_ms: previous.map_or(now_ms, |p| p.created_ms),
            updated_ms: now_ms,
        })
    }

    /// The etag (quoted form is added by the HTTP layer).
    pub fn etag(&self) -> String {
        crate::registry::etag_of(self.version)
    }

    /// The service API's JSON, with `id_field` set to `id`.
    pub fn to_json(&self, id_field: &str, id: &str) -> Value {
        let attestation = match &self.attestation {
            Attestation::SymmetricKey { keys } => json!({
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": keys.primary, "secondaryKey": keys.secondary},
            }),
            Attestation::X509 { certificates } => {
                // As DPS answers: what the certificates are, not the certificates.
                let mut slots = serde_json::Map::new();
                for (slot, text) in ["primary", "secondary"].iter().zip(certificates) {
                    let der = verge_x509::parse_certs(text)
                        .ok()
                        .and_then(|c| c.into_iter().next());
                    let info = der.map_or(json!({}), |d| {
                        let (sha1, sha256) = verge_x509::thumbprints(&d);
                        json!({"subjectName": verge_x509::common_name(&d).map(|cn| format!("CN={cn}")),
                               "sha1Thumbprint": sha1, "sha256Thumbprint": sha256})
                    });
                    slots.insert((*slot).to_owned(), json!({ "info": info }));
                }
                let field = x509_field(id_field == "enrollmentGroupId");
                json!({"type": "x509", "x509": { field: slots }})
            }
        };
        let iso = |ms| verge_core::time::Timestamp::from_millis(ms).to_iso8601();
        let mut v = json!({
            id_field: id,
            "attestation": attestation,
            "capabilities": {"iotEdge": self.iot_edge},
            "provisioningStatus": if self.disabled { "disabled" } else { "enabled" },
            "reprovisionPolicy": {
                "updateHubAssignment": self.reprovision.update_hub_assignment,
                "migrateDeviceData": self.reprovision.migrate_device_data,
            },
            "allocationPolicy": "static",
            "etag": self.etag(),
            "createdDateTimeUtc": iso(self.created_ms),
            "lastUpdatedDateTimeUtc": iso(self.updated_ms),
        });
        if let Some(o) = v.as_object_mut() {
            if let Some(d) = &self.device_id {
                o.insert("deviceId".into(), json!(d));
            }
            if let Some(h) = &self.iot_hub_host_name {
                o.insert("iotHubHostName".into(), json!(h));
            }
            if let Some(t) = &self.initial_twin {
                o.insert("initialTwin".into(), t.clone());
            }
            if let Some(p) = &self.payload {
                o.insert("payload".into(), p.clone());
            }
        }
        v
    }

    /// The keys a registration `registration_id` may sign with: the
    /// enrollment's own (individual), or derived from the group's keys as
    /// HMAC-SHA256(group key, registration id) (group).
    pub fn device_keys(&self, registration_id: &str, group: bool) -> Option<SymmetricKeys> {
        let Attestation::SymmetricKey { keys } = &self.attestation else {
            return None;
        };
        if !group {
            return Some(keys.clone());
        }
        let derive = |k: &str| {
            SharedAccessKey::from_base64(k)
                .ok()
                .map(|k| k.derive(registration_id).to_base64())
        };
        Some(SymmetricKeys {
            primary: derive(&keys.primary)?,
            secondary: derive(&keys.secondary)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn group_key_derivation_matches_the_sdk_sample() {
        // base64(HMAC-SHA256(b64decode(group key), registration id)), as
        // azure-iot-sdk-python's provision_symmetric_key_group.py derives it;
        // the expected value is Python's hmac output for these inputs.
        let group = Enrollment::from_json(
            &json!({"attestation": {"type": "symmetricKey", "symmetricKey": {
                "primaryKey": "AAECAwQFBgcICQoLDA0ODw==", "secondaryKey": "AAECAwQFBgcICQoLDA0ODw=="}}}),
            "enrollmentGroupId", "g", true, None, 0,
        )
        .unwrap();
        let keys = group.device_keys("dev-1", true).unwrap();
        assert_eq!(keys.primary, PY_DERIVED);
    }

    // python3 -c 'import hmac,hashlib,base64;print(base64.b64encode(hmac.new(bytes(range(16)),b"dev-1",hashlib.sha256).digest()).decode())'
    const PY_DERIVED: &str = "I6wj/zJDkG6Ta/Wc6A5aw/nV0gAkdMKN32/YWUcI028=";

    #[test]
    fn bodies_are_checked() {
        let e = |v: Value| {
            Enrollment::from_json(&v, "registrationId", "r", false, None, 0)
                .unwrap_err()
                .to_string()
        };
        assert!(e(json!([])).contains("JSON object"));
        assert!(e(json!({})).contains("attestation"));
        assert!(e(json!({"attestation": {"type": "tpm"}})).contains("not supported"));
        assert!(e(json!({"attestation": {"type": "x509"}})).contains("attestation.x509"));
        assert!(
            e(json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "nope"}}}}}))
                .contains("clientCertificates.primary.certificate")
        );
        assert!(
            e(json!({"attestation": {"type": "x509", "x509": {"signingCertificates": {}}}}))
                .contains("enrollment groups")
        );
        assert!(
            e(json!({"registrationId": "x", "attestation": {"type": "symmetricKey"}}))
                .contains("does not match")
        );
        assert!(e(json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "!!"}}})).contains("primaryKey"));
        assert!(
            e(json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "on"}))
                .contains("provisioningStatus")
        );
        assert!(e(json!({"attestation": {"type": "symmetricKey"}, "initialTwin": {"properties": {"reported": {}}}})).contains("initialTwin"));
        assert!(check_registration_id("Dev").is_err());
        assert!(check_registration_id("dev-1.a:b_c").is_ok());
    }
}
