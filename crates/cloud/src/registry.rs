//! Identity records (devices and modules) and their IoT Hub JSON forms.
//!
//! The records are what is persisted; [`DeviceRecord::to_json`] and
//! [`ModuleRecord::to_json`] produce the service API's `Device` and `Module`
//! shapes (the field names the official service SDKs deserialize).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::SharedAccessKey;
use verge_core::time::Timestamp;
use verge_endpoint::session::Transport;

use crate::error::{CloudError, Result};

/// IoT Hub's "never" for timestamps the service has no value for.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// `enabled` / `disabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// May connect.
    Enabled,
    /// Refused at authentication.
    Disabled,
}

impl DeviceStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// The two symmetric keys of a SAS identity, base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymmetricKeys {
    /// Primary key.
    pub primary: String,
    /// Secondary key.
    pub secondary: String,
}

impl std::fmt::Debug for SymmetricKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: never in logs.
        f.write_str("SymmetricKeys(..)")
    }
}

impl SymmetricKeys {
    /// Two fresh random 32-byte keys (the size IoT Hub generates).
    pub fn generate() -> Self {
        Self {
            primary: random_key(),
            secondary: random_key(),
        }
    }

    /// Both keys, decoded.
    pub fn decoded(&self) -> Vec<SharedAccessKey> {
        [&self.primary, &self.secondary]
            .into_iter()
            .filter_map(|k| SharedAccessKey::from_base64(k).ok())
            .collect()
    }
}

fn random_key() -> String {
    // uuid v4 draws from the OS RNG; two of them give 32 random bytes
    // (minus the 12 fixed version/variant bits, still 244 bits of entropy).
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    b.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A fresh generation id: IoT Hub uses a decimal number that changes when an
/// identity with the same id is deleted and created again.
pub fn new_generation_id() -> String {
    let v = uuid::Uuid::new_v4().as_u64_pair().0 % 1_000_000_000_000_000_000;
    format!("{v:018}")
}

/// An opaque etag derived from a per-record counter.
pub fn etag_of(version: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_string())
}

/// True when an `If-Match` value (quoted or not, or `*`) matches `etag`.
/// The service SDKs quote every etag, `*` included (`"*"`).
pub fn if_match(header: &str, etag: &str) -> bool {
    let h = header.trim().trim_matches('"');
    h == "*" || h == etag
}

/// True for `*` or `"*"`.
pub fn is_wildcard(header: &str) -> bool {
    header.trim().trim_matches('"') == "*"
}

/// A device identity as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The id.
    pub device_id: String,
    /// Changes when the id is re-created.
    pub generation_id: String,
    /// Bumped on every update; the etag is derived from it.
    pub etag_version: u64,
    /// enabled/disabled.
    pub status: DeviceStatus,
    /// Free text.
    pub status_reason: Option<String>,
    /// When `status` last changed (ms).
    pub status_updated_ms: i64,
    /// SAS keys.
    pub keys: SymmetricKeys,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// An edge device's own scope, or a leaf's parent scope.
    pub device_scope: Option<String>,
    /// The parent edge device's scope (at most one).
    pub parent_scopes: Vec<String>,
    /// X.509 authentication (`selfSigned` or `certificateAuthority`);
    /// `None` = SAS (records written before X.509 existed have none).
    #[serde(default)]
    pub x509: Option<verge_x509::X509Auth>,
}

impl DeviceRecord {
    /// The current etag.
    pub fn etag(&self) -> String {
        etag_of(self.etag_version)
    }

    /// The scope an edge device gets: `ms-azure-iot-edge://{id}-{generation}`.
    pub fn edge_scope(device_id: &str, generation_id: &str) -> String {
        format!("ms-azure-iot-edge://{device_id}-{generation_id}")
    }

    /// The service API's `Device` JSON.
    pub fn to_json(&self, conn: &ConnInfo) -> Value {
        conn.add_protocol(json!({
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": conn.state(),
            "status": self.status.as_str(),
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": conn.updated_iso(),
            "statusUpdatedTime": iso_or_never(self.status_updated_ms),
            "lastActivityTime": conn.activity_iso(),
            "cloudToDeviceMessageCount": conn.c2d_count,
            "authentication": auth_json(&self.keys, self.x509.as_ref()),
            "capabilities": { "iotEdge": self.iot_edge },
            "deviceScope": self.device_scope,
            "parentScopes": self.parent_scopes,
        }))
    }
}

/// A module identity as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// The device.
    pub device_id: String,
    /// The module.
    pub module_id: String,
    /// Changes when the id is re-created.
    pub generation_id: String,
    /// Bumped on every update.
    pub etag_version: u64,
    /// Who manages it (`IotEdge` for modules a deployment created).
    pub managed_by: Option<String>,
    /// SAS keys.
    pub keys: SymmetricKeys,
}

impl ModuleRecord {
    /// The current etag.
    pub fn etag(&self) -> String {
        etag_of(self.etag_version)
    }

    /// The service API's `Module` JSON.
    pub fn to_json(&self, conn: &ConnInfo) -> Value {
        conn.add_protocol(json!({
            "moduleId": self.module_id,
            "managedBy": self.managed_by,
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": conn.state(),
            "connectionStateUpdatedTime": conn.updated_iso(),
            "lastActivityTime": conn.activity_iso(),
            "cloudToDeviceMessageCount": 0,
            "authentication": auth_json(&self.keys, None),
        }))
    }
}

fn auth_json(keys: &SymmetricKeys, x509: Option<&verge_x509::X509Auth>) -> Value {
    use verge_x509::X509Auth;
    match x509 {
        None => json!({
            "symmetricKey": { "primaryKey": keys.primary, "secondaryKey": keys.secondary },
            "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
            "type": "sas",
        }),
        // An X.509 identity shows no keys (IoT Hub's shape).
        Some(X509Auth::SelfSigned { primary, secondary }) => json!({
            "symmetricKey": { "primaryKey": null, "secondaryKey": null },
            "x509Thumbprint": { "primaryThumbprint": primary, "secondaryThumbprint": secondary },
            "type": "selfSigned",
        }),
        Some(X509Auth::CertificateAuthority) => json!({
            "symmetricKey": { "primaryKey": null, "secondaryKey": null },
            "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
            "type": "certificateAuthority",
        }),
    }
}

fn iso_or_never(ms: i64) -> String {
    if ms <= 0 {
        NEVER.to_owned()
    } else {
        Timestamp::from_millis(ms).to_iso8601()
    }
}

/// Live connection facts (not persisted: after a restart nothing is connected).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// Connected now.
    pub connected: bool,
    /// When `connected` last changed (ms, 0 = never).
    pub updated_ms: i64,
    /// Last message or twin operation (ms, 0 = never).
    pub activity_ms: i64,
    /// C2D messages waiting.
    pub c2d_count: usize,
    /// The protocol of the last connection (`None` = never connected
    /// since this verge-cloud started).
    pub transport: Option<Transport>,
}

impl ConnInfo {
    fn state(&self) -> &'static str {
        if self.connected {
            "Connected"
        } else {
            "Disconnected"
        }
    }
    /// Verge's addition to IoT Hub's identity JSON: `connectionProtocol`
    /// (`MQTT`, `MQTT_WS`, `AMQP`, `AMQP_WS`) once the identity connected.
    fn add_protocol(&self, mut v: Value) -> Value {
        if let (Some(t), Some(o)) = (self.transport, v.as_object_mut()) {
            o.insert("connectionProtocol".into(), Value::from(t.as_str()));
        }
        v
    }
    fn updated_iso(&self) -> String {
        iso_or_never(self.updated_ms)
    }
    fn activity_iso(&self) -> String {
        iso_or_never(self.activity_ms)
    }
}

/// What a PUT of a device asks for (the fields the service reads).
#[derive(Debug, Clone, Default)]
pub struct DeviceSpec {
    /// enabled/disabled (default enabled).
    pub status: Option<DeviceStatus>,
    /// Free text.
    pub status_reason: Option<String>,
    /// Keys; generated when absent or empty.
    pub keys: Option<SymmetricKeys>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// `deviceScope` as sent.
    pub device_scope: Option<String>,
    /// `parentScopes` as sent.
    pub parent_scopes: Vec<String>,
    /// `authentication.type` `selfSigned` / `certificateAuthority`.
    pub x509: Option<verge_x509::X509Auth>,
    /// `authentication.type` `sas` was sent explicitly (an update back to
    /// SAS); with neither, an update keeps the device's authentication.
    pub sas_given: bool,
}

impl DeviceSpec {
    /// Reads the service API's `Device` JSON; `path_id` is the id in the URL.
    pub fn from_json(path_id: &str, v: &Value) -> Result<Self> {
        let o = v
            .as_object()
            .ok_or_else(|| bad("the body must be a JSON object (a Device)"))?;
        if let Some(id) = o.get("deviceId").and_then(Value::as_str)
            && id != path_id
        {
            return Err(bad(format!(
                "deviceId {id:?} in the body does not match {path_id:?} in the path"
            )));
        }
        let status = match o.get("status") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("enabled") => {
                Some(DeviceStatus::Enabled)
            }
            Some(Value::String(s)) if s.eq_ignore_ascii_case("disabled") => {
                Some(DeviceStatus::Disabled)
            }
            Some(other) => {
                return Err(bad(format!(
                    "status must be \"enabled\" or \"disabled\", got {other}"
                )));
            }
        };
        let iot_edge = match o.get("capabilities").and_then(|c| c.get("iotEdge")) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(bad(format!(
                    "capabilities.iotEdge must be a boolean, got {other}"
                )));
            }
        };
        let parent_scopes = match o.get("parentScopes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("parentScopes must be an array of strings"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("parentScopes must be an array of strings")),
        };
        let (x509, sas_given) = x509_from_auth(o.get("authentication"))?;
        let keys = if x509.is_some() {
            None
        } else {
            keys_from_auth(o.get("authentication"))?
        };
        Ok(Self {
            x509,
            sas_given,
            status,
            status_reason: opt_string(o.get("statusReason"), "statusReason")?,
            keys,
            iot_edge,
            device_scope: opt_string(o.get("deviceScope"), "deviceScope")?
                .filter(|s| !s.is_empty()),
            parent_scopes,
        })
    }
}

/// What a PUT of a module asks for.
#[derive(Debug, Clone, Default)]
pub struct ModuleSpec {
    /// `managedBy`.
    pub managed_by: Option<String>,
    /// Keys; generated when absent or empty.
    pub keys: Option<SymmetricKeys>,
}

impl ModuleSpec {
    /// Reads the service API's `Module` JSON.
    pub fn from_json(device: &str, module: &str, v: &Value) -> Result<Self> {
        let o = v
            .as_object()
            .ok_or_else(|| bad("the body must be a JSON object (a Module)"))?;
        for (field, want) in [("deviceId", device), ("moduleId", module)] {
            if let Some(id) = o.get(field).and_then(Value::as_str)
                && id != want
            {
                return Err(bad(format!(
                    "{field} {id:?} in the body does not match {want:?} in the path"
                )));
            }
        }
        Ok(Self {
            managed_by: opt_string(o.get("managedBy"), "managedBy")?,
            keys: keys_from_auth(o.get("authentication"))?,
        })
    }
}

fn bad(m: impl Into<String>) -> CloudError {
    CloudError::BadRequest(m.into())
}

fn opt_string(v: Option<&Value>, name: &str) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!("{name} must be a string, got {other}"))),
    }
}

/// A device's `authentication` when its type is `selfSigned` (thumbprints:
/// 40 or 64 hex digits, the same length when both are set) or
/// `certificateAuthority`; and whether `sas` was named explicitly.
fn x509_from_auth(v: Option<&Value>) -> Result<(Option<verge_x509::X509Auth>, bool)> {
    let Some(auth) = v.filter(|v| !v.is_null()) else {
        return Ok((None, false));
    };
    let Some(kind) = auth.get("type").and_then(Value::as_str) else {
        return Ok((None, false));
    };
    if kind.eq_ignore_ascii_case("certificateAuthority") {
        return Ok((Some(verge_x509::X509Auth::CertificateAuthority), false));
    }
    if !kind.eq_ignore_ascii_case("selfSigned") {
        return Ok((None, kind.eq_ignore_ascii_case("sas")));
    }
    let thumb = |name: &str| -> Result<Option<String>> {
        let t = auth.get("x509Thumbprint").and_then(|t| t.get(name));
        opt_string(t, &format!("authentication.x509Thumbprint.{name}"))?
            .filter(|t| !t.is_empty())
            .map(|t| {
                verge_x509::normalize_thumbprint(&t)
                    .map_err(|e| bad(format!("authentication.x509Thumbprint.{name}: {e}")))
            })
            .transpose()
    };
    let (primary, secondary) = (thumb("primaryThumbprint")?, thumb("secondaryThumbprint")?);
    match (&primary, &secondary) {
        (None, None) => {
            return Err(bad(
                "authentication.type selfSigned needs x509Thumbprint.primaryThumbprint or secondaryThumbprint",
            ));
        }
        (Some(p), Some(s)) if p.len() != s.len() => {
            return Err(bad(
                "the primary and secondary thumbprints must both be SHA-1 or both SHA-256",
            ));
        }
        _ => {}
    }
    Ok((
        Some(verge_x509::X509Auth::SelfSigned { primary, secondary }),
        false,
    ))
}

/// `authentication` of SAS identities (absent means SAS); X.509 types are
/// read by `x509_from_auth` for devices, and refused for modules.
fn keys_from_auth(v: Option<&Value>) -> Result<Option<SymmetricKeys>> {
    let Some(auth) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = auth.get("type").and_then(Value::as_str).unwrap_or("sas");
    if !kind.eq_ignore_ascii_case("sas") {
        return Err(bad(format!(
            "authentication.type {kind:?} is not supported here by verge-cloud (\"sas\"; devices may also use \"selfSigned\" or \"certificateAuthority\")"
        )));
    }
    let key = |name: &str| -> Result<Option<String>> {
        let k = auth.get("symmetricKey").and_then(|s| s.get(name));
        let k = opt_string(k, &format!("authentication.symmetricKey.{name}"))?
            .filter(|k| !k.is_empty());
        if let Some(k) = &k {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k)
                .map_err(|_| bad(format!("authentication.symmetricKey.{name} is not base64")))?;
            if !(16..=64).contains(&raw.len()) {
                return Err(bad(format!(
                    "authentication.symmetricKey.{name} must decode to 16..64 bytes, got {}",
                    raw.len()
                )));
            }
        }
        Ok(k)
    };
    match (key("primaryKey")?, key("secondaryKey")?) {
        (None, None) => Ok(None),
        (Some(p), Some(s)) => Ok(Some(SymmetricKeys {
            primary: p,
            secondary: s,
        })),
        // One given: keep it, generate the other (IoT Hub does the same).
        (Some(p), None) => Ok(Some(SymmetricKeys {
            primary: p,
            secondary: random_key(),
        })),
        (None, Some(s)) => Ok(Some(SymmetricKeys {
            primary: random_key(),
            secondary: s,
        })),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_keys_are_32_bytes_and_distinct() {
        let k = SymmetricKeys::generate();
        assert_eq!(k.decoded().len(), 2);
        assert_eq!(k.decoded()[0].as_bytes().len(), 32);
        assert_ne!(k.primary, k.secondary);
        assert_ne!(new_generation_id(), new_generation_id());
        assert_eq!(format!("{k:?}"), "SymmetricKeys(..)");
    }

    #[test]
    fn device_spec_parsing() {
        let v = json!({"deviceId": "d1", "status": "disabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAA==", "secondaryKey": null}},
            "capabilities": {"iotEdge": true}, "parentScopes": ["p"]});
        let s = DeviceSpec::from_json("d1", &v).unwrap();
        assert_eq!(s.status, Some(DeviceStatus::Disabled));
        assert!(s.iot_edge);
        let keys = s.keys.unwrap();
        assert_eq!(keys.primary, "AAAAAAAAAAAAAAAAAAAAAA==");
        assert_eq!(keys.decoded().len(), 2);
        assert_eq!(s.parent_scopes, vec!["p".to_owned()]);
        assert!(DeviceSpec::from_json("other", &v).is_err());
        let short = json!({"authentication": {"symmetricKey": {"primaryKey": "AAAA"}}});
        assert!(
            DeviceSpec::from_json("d", &short)
                .unwrap_err()
                .to_string()
                .contains("16..64")
        );
        let x509 = json!({"authentication": {"type": "selfSigned"}});
        assert!(DeviceSpec::from_json("d", &x509).is_err());
        let t1 = "ab".repeat(20);
        let t256 = "CD".repeat(32);
        let x509 = json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": t1, "secondaryThumbprint": null}}});
        let s = DeviceSpec::from_json("d", &x509).unwrap();
        assert_eq!(
            s.x509,
            Some(verge_x509::X509Auth::SelfSigned {
                primary: Some(t1.to_ascii_uppercase()),
                secondary: None
            })
        );
        assert!(s.keys.is_none() && !s.sas_given);
        let mixed = json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": t1, "secondaryThumbprint": t256}}});
        assert!(DeviceSpec::from_json("d", &mixed).is_err());
        let short = json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": "ABC"}}});
        assert!(DeviceSpec::from_json("d", &short).is_err());
        let ca = json!({"authentication": {"type": "certificateAuthority"}});
        assert_eq!(
            DeviceSpec::from_json("d", &ca).unwrap().x509,
            Some(verge_x509::X509Auth::CertificateAuthority)
        );
        let none = json!({"authentication": {"type": "none"}});
        assert!(DeviceSpec::from_json("d", &none).is_err());
        assert!(ModuleSpec::from_json("d", "m", &ca).is_err());
        assert!(if_match("\"abc\"", "abc") && if_match("*", "x") && if_match("\"*\"", "x"));
        assert!(!if_match("abd", "abc") && is_wildcard("\"*\"") && !is_wildcard("abc"));
    }
}
