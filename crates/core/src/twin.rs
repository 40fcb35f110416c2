//! Device and module twins: tags, desired and reported properties, versions
//! and per-property `$metadata`, patched with JSON merge-patch semantics.

use serde_json::{Map, Value, json};

use crate::time::Timestamp;

/// Largest serialized desired or reported section (IoT Hub's limit).
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Largest serialized tags object.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
/// Deepest nesting of objects inside a section (IoT Hub's limit).
pub const MAX_DEPTH: usize = 10;

/// Why a patch was refused. The twin is unchanged when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// A patch must be a JSON object.
    #[error("twin patch must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// Keys beginning with `$`, or holding `.`, space or control characters, are reserved or invalid.
    #[error("twin key {key:?} at {path} is not allowed: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// Where it is (dotted path).
        path: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// Too deeply nested.
    #[error("twin {section} is nested deeper than {MAX_DEPTH} levels at {path}")]
    TooDeep {
        /// desired, reported or tags.
        section: &'static str,
        /// Where.
        path: String,
    },
    /// The section would exceed its size limit.
    #[error("twin {section} would be {size} bytes; the limit is {limit}")]
    TooLarge {
        /// desired, reported or tags.
        section: &'static str,
        /// The size after the patch.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// One property section (desired or reported) with its version and metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TwinSection {
    /// The properties, without `$version`/`$metadata`.
    pub properties: Map<String, Value>,
    /// Incremented by every patch or replacement.
    pub version: u64,
    /// Mirrors `properties`; each node carries `$lastUpdated` (and
    /// `$lastUpdatedVersion` for desired properties).
    pub metadata: Map<String, Value>,
    /// When anything in the section last changed.
    pub last_updated: Option<Timestamp>,
}

impl TwinSection {
    /// The section as IoT Hub returns it: properties plus `$metadata` and `$version`.
    pub fn to_json(&self) -> Value {
        let mut m = self.properties.clone();
        let mut meta = self.metadata.clone();
        if let Some(t) = self.last_updated {
            meta.insert("$lastUpdated".into(), Value::String(t.to_iso8601()));
        }
        m.insert("$metadata".into(), Value::Object(meta));
        m.insert("$version".into(), json!(self.version));
        Value::Object(m)
    }

    /// The section as the device SDKs expect it (properties and `$version`).
    pub fn to_client_json(&self) -> Value {
        let mut m = self.properties.clone();
        m.insert("$version".into(), json!(self.version));
        Value::Object(m)
    }

    fn size(&self) -> usize {
        serde_json::to_vec(&self.properties).map_or(usize::MAX, |v| v.len())
    }
}

fn check_keys(
    section: &'static str,
    obj: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::TooDeep {
            section,
            path: path.to_owned(),
        });
    }
    for (k, v) in obj {
        let here = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let bad = |reason| TwinError::BadKey {
            key: k.clone(),
            path: path.to_owned(),
            reason,
        };
        if k.is_empty() {
            return Err(bad("keys must not be empty"));
        }
        if k.starts_with('$') {
            return Err(bad("keys starting with '$' are reserved"));
        }
        if k.contains('.') || k.contains(' ') || k.contains('$') {
            return Err(bad("keys must not contain '.', ' ' or '$'"));
        }
        if k.chars().any(char::is_control) {
            return Err(bad("keys must not contain control characters"));
        }
        if k.len() > 1024 {
            return Err(bad("keys are limited to 1 KB"));
        }
        if let Value::Object(inner) = v {
            check_keys(section, inner, &here, depth + 1)?;
        }
    }
    Ok(())
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: members
/// added or changed as they are in `new`, removed ones as `null`, nested
/// objects diffed member by member; empty when the two are equal. Used
/// wherever a document is replaced but only a patch can travel (deployments,
/// twin GETs after a reconnect, reported state).
pub fn merge_diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for k in old.keys() {
        if !new.contains_key(k) {
            out.insert(k.clone(), Value::Null);
        }
    }
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(o), n) if o == n => {}
            (Some(Value::Object(o)), Value::Object(n)) => {
                out.insert(k.clone(), Value::Object(merge_diff(o, n)));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Applies `patch` to `target` (RFC 7386: `null` deletes, objects merge),
/// mirroring every touched leaf into `meta`.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    stamp: &Value,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
                meta.remove(k);
            }
            Value::Object(p) => {
                let t = target
                    .entry(k.clone())
                    .and_modify(|t| {
                        if !t.is_object() {
                            *t = Value::Object(Map::new());
                        }
                    })
                    .or_insert_with(|| Value::Object(Map::new()));
                let m = meta
                    .entry(k.clone())
                    .and_modify(|m| {
                        if !m.is_object() {
                            *m = Value::Object(Map::new());
                        }
                    })
                    .or_insert_with(|| Value::Object(Map::new()));
                if let (Value::Object(t), Value::Object(m)) = (t, m) {
                    // Keep only child metadata for keys that still exist.
                    m.retain(|mk, _| {
                        mk.starts_with('$') || t.contains_key(mk) || p.contains_key(mk)
                    });
                    merge(t, m, p, stamp);
                    if let Value::Object(s) = stamp {
                        for (sk, sv) in s {
                            m.insert(sk.clone(), sv.clone());
                        }
                    }
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
                meta.insert(k.clone(), stamp.clone());
            }
        }
    }
}

impl TwinSection {
    fn apply(
        &mut self,
        section: &'static str,
        patch: &Value,
        now: Timestamp,
        with_version_meta: bool,
    ) -> Result<u64, TwinError> {
        let Value::Object(p) = patch else {
            return Err(TwinError::NotAnObject(crate::json_type_name(patch)));
        };
        check_keys(section, p, "", 1)?;
        let mut next = self.clone();
        next.version += 1;
        let mut stamp = Map::new();
        stamp.insert("$lastUpdated".into(), Value::String(now.to_iso8601()));
        if with_version_meta {
            stamp.insert("$lastUpdatedVersion".into(), json!(next.version));
        }
        merge(
            &mut next.properties,
            &mut next.metadata,
            p,
            &Value::Object(stamp),
        );
        next.last_updated = Some(now);
        let size = next.size();
        if size > MAX_SECTION_BYTES {
            return Err(TwinError::TooLarge {
                section,
                size,
                limit: MAX_SECTION_BYTES,
            });
        }
        *self = next;
        Ok(self.version)
    }
}

/// A device or module twin.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Twin {
    /// The device.
    pub device_id: String,
    /// The module, for a module twin.
    pub module_id: Option<String>,
    /// Bumped on every change.
    pub version: u64,
    /// Tags (service-side only).
    pub tags: Map<String, Value>,
    /// Desired properties.
    pub desired: TwinSection,
    /// Reported properties.
    pub reported: TwinSection,
}

impl Twin {
    /// An empty twin.
    pub fn new(device_id: impl Into<String>, module_id: Option<String>) -> Self {
        Self {
            device_id: device_id.into(),
            module_id,
            ..Self::default()
        }
    }

    /// An opaque tag that changes whenever the twin does.
    pub fn etag(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.version.to_be_bytes())
    }

    /// Merges a desired-properties patch; returns the new desired `$version`.
    pub fn patch_desired(&mut self, patch: &Value, now: Timestamp) -> Result<u64, TwinError> {
        let v = self.desired.apply("desired", patch, now, true)?;
        self.version += 1;
        Ok(v)
    }

    /// Merges a reported-properties patch; returns the new reported `$version`.
    pub fn patch_reported(&mut self, patch: &Value, now: Timestamp) -> Result<u64, TwinError> {
        let v = self.reported.apply("reported", patch, now, false)?;
        self.version += 1;
        Ok(v)
    }

    /// Replaces the desired properties wholesale (a deployment's module section).
    /// Keys no longer present are deleted; the version still increments.
    pub fn replace_desired(&mut self, desired: &Value, now: Timestamp) -> Result<u64, TwinError> {
        // A full write: every property is restamped, the version continues.
        let mut next = TwinSection {
            version: self.desired.version,
            ..TwinSection::default()
        };
        let v = next.apply("desired", desired, now, true)?;
        self.desired = next;
        self.version += 1;
        Ok(v)
    }

    /// Replaces the tags (service-side).
    pub fn replace_tags(&mut self, tags: &Value) -> Result<(), TwinError> {
        let Value::Object(t) = tags else {
            return Err(TwinError::NotAnObject(crate::json_type_name(tags)));
        };
        check_keys("tags", t, "", 1)?;
        let size = serde_json::to_vec(t).map_or(usize::MAX, |v| v.len());
        if size > MAX_TAGS_BYTES {
            return Err(TwinError::TooLarge {
                section: "tags",
                size,
                limit: MAX_TAGS_BYTES,
            });
        }
        self.tags = t.clone();
        self.version += 1;
        Ok(())
    }

    /// The twin as IoT Hub's service API returns it.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "deviceId": self.device_id,
            "etag": self.etag(),
            "version": self.version,
            "tags": self.tags,
            "properties": {
                "desired": self.desired.to_json(),
                "reported": self.reported.to_json(),
            }
        });
        if let (Some(m), Value::Object(o)) = (&self.module_id, &mut v) {
            o.insert("moduleId".into(), Value::String(m.clone()));
        }
        v
    }

    /// The body of a device-side twin GET: `{"desired": …, "reported": …}`.
    pub fn to_client_json(&self) -> Value {
        json!({
            "desired": self.desired.to_client_json(),
            "reported": self.reported.to_client_json(),
        })
    }

    /// The desired patch pushed to clients after `patch` was applied:
    /// the patch plus `"$version"`.
    pub fn desired_patch_message(&self, patch: &Value) -> Value {
        let mut m = match patch {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        m.insert("$version".into(), json!(self.desired.version));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn merge_diff_nulls_removals_and_recurses() {
        let old = json!({"a": 1, "b": {"x": 1, "y": 2}, "gone": true, "o": {"k": 1}});
        let new = json!({"a": 1, "b": {"x": 1, "y": 3}, "c": "new", "o": 5});
        let (Value::Object(o), Value::Object(n)) = (old, new) else {
            unreachable!()
        };
        assert_eq!(
            Value::Object(merge_diff(&o, &n)),
            json!({"gone": null, "b": {"y": 3}, "c": "new", "o": 5})
        );
        assert!(merge_diff(&n, &n).is_empty());
    }

    #[test]
    fn merge_patch_semantics_and_versions() {
        let mut tw = Twin::new("edge1", Some("filter".into()));
        assert_eq!(
            tw.patch_reported(&json!({"fw": "1.0", "cfg": {"a": 1, "b": 2}}), t(1000)),
            Ok(1)
        );
        assert_eq!(
            tw.patch_reported(
                &json!({"fw": "1.2", "cfg": {"a": null, "c": 3}, "gone": null}),
                t(2000)
            ),
            Ok(2)
        );
        assert_eq!(
            tw.to_client_json()["reported"],
            json!({"fw": "1.2", "cfg": {"b": 2, "c": 3}, "$version": 2})
        );
        // Metadata: touched leaves restamped, untouched ones kept, deleted ones dropped.
        let meta = &tw.reported.metadata;
        assert_eq!(
            meta["fw"]["$lastUpdated"],
            json!("1970-01-01T00:00:02.000Z")
        );
        assert_eq!(
            meta["cfg"]["b"]["$lastUpdated"],
            json!("1970-01-01T00:00:01.000Z")
        );
        assert_eq!(
            meta["cfg"]["c"]["$lastUpdated"],
            json!("1970-01-01T00:00:02.000Z")
        );
        assert!(meta["cfg"].get("a").is_none());
        assert_eq!(tw.version, 2);
        let full = tw.to_json();
        assert_eq!(full["moduleId"], json!("filter"));
        assert_eq!(full["properties"]["reported"]["$version"], json!(2));
        assert_eq!(
            full["properties"]["reported"]["$metadata"]["$lastUpdated"],
            json!("1970-01-01T00:00:02.000Z")
        );
        // A scalar replaced by an object and back.
        tw.patch_reported(&json!({"fw": {"major": 2}}), t(3000))
            .unwrap();
        tw.patch_reported(&json!({"fw": "3"}), t(4000)).unwrap();
        assert_eq!(tw.reported.properties["fw"], json!("3"));
        assert_eq!(
            tw.reported.metadata["fw"]["$lastUpdated"],
            json!("1970-01-01T00:00:04.000Z")
        );
    }

    #[test]
    fn desired_patches_carry_version() {
        let mut tw = Twin::new("edge1", None);
        let patch = json!({"SendInterval": 5});
        let v = tw.patch_desired(&patch, t(0)).unwrap();
        assert_eq!(v, 1);
        assert_eq!(
            tw.desired_patch_message(&patch),
            json!({"SendInterval": 5, "$version": 1})
        );
        assert_eq!(
            tw.desired.metadata["SendInterval"]["$lastUpdatedVersion"],
            json!(1)
        );
        assert_eq!(tw.to_client_json()["desired"]["$version"], json!(1));
    }

    #[test]
    fn replace_desired_drops_missing_keys() {
        let mut tw = Twin::new("edge1", Some("m".into()));
        tw.patch_desired(&json!({"a": 1, "o": {"x": 1, "y": 2}}), t(0))
            .unwrap();
        let v = tw
            .replace_desired(&json!({"o": {"y": 3}, "b": true}), t(1))
            .unwrap();
        assert_eq!(v, 2);
        assert_eq!(
            tw.to_client_json()["desired"],
            json!({"o": {"y": 3}, "b": true, "$version": 2})
        );
    }

    #[test]
    fn refusals_leave_the_twin_unchanged() {
        let mut tw = Twin::new("d", None);
        tw.patch_reported(&json!({"ok": 1}), t(0)).unwrap();
        let before = tw.clone();
        assert_eq!(
            tw.patch_reported(&json!([1]), t(1)),
            Err(TwinError::NotAnObject("an array"))
        );
        assert!(matches!(
            tw.patch_reported(&json!({"$version": 3}), t(1)),
            Err(TwinError::BadKey {
                reason: "keys starting with '$' are reserved",
                ..
            })
        ));
        assert!(matches!(
            tw.patch_reported(&json!({"a": {"b.c": 1}}), t(1)),
            Err(TwinError::BadKey { ref path, .. }) if path == "a"
        ));
        assert!(matches!(
            tw.patch_reported(&json!({"a b": 1}), t(1)),
            Err(TwinError::BadKey { .. })
        ));
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "n": deep });
        }
        assert!(matches!(
            tw.patch_reported(&deep, t(1)),
            Err(TwinError::TooDeep { .. })
        ));
        let big = "x".repeat(MAX_SECTION_BYTES);
        assert!(matches!(
            tw.patch_reported(&json!({"big": big}), t(1)),
            Err(TwinError::TooLarge {
                section: "reported",
                limit: MAX_SECTION_BYTES,
                ..
            })
        ));
        assert_eq!(tw, before);
        // Exactly at the limit is fine.
        let overhead = serde_json::to_vec(&json!({"ok": 1, "big": ""}))
            .unwrap()
            .len();
        tw.patch_reported(
            &json!({"big": "y".repeat(MAX_SECTION_BYTES - overhead)}),
            t(2),
        )
        .unwrap();
        assert!(matches!(
            tw.replace_tags(&json!({"t": "z".repeat(MAX_TAGS_BYTES)})),
            Err(TwinError::TooLarge {
                section: "tags",
                ..
            })
        ));
        tw.replace_tags(&json!({"site": "plant-3"})).unwrap();
        assert_eq!(tw.to_json()["tags"], json!({"site": "plant-3"}));
        assert_ne!(tw.etag(), before.etag());
    }
}
