//! Persisted form of [`verge_core::Twin`] (the core type has no serde, by
//! design: it does no I/O), the service-side tag merge, and the desired patch
//! a wholesale replacement sends to the device.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use verge_core::Twin;
use verge_core::time::Timestamp;
use verge_core::twin::TwinSection;

/// A twin as stored in the `twins` keyspace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredTwin {
    device_id: String,
    module_id: Option<String>,
    version: u64,
    tags: Map<String, Value>,
    desired: StoredSection,
    reported: StoredSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSection {
    properties: Map<String, Value>,
    version: u64,
    metadata: Map<String, Value>,
    last_updated_ms: Option<i64>,
}

impl From<&TwinSection> for StoredSection {
    fn from(s: &TwinSection) -> Self {
        Self {
            properties: s.properties.clone(),
            version: s.version,
            metadata: s.metadata.clone(),
            last_updated_ms: s.last_updated.map(Timestamp::as_millis),
        }
    }
}

impl From<StoredSection> for TwinSection {
    fn from(s: StoredSection) -> Self {
        Self {
            properties: s.properties,
            version: s.version,
            metadata: s.metadata,
            last_updated: s.last_updated_ms.map(Timestamp::from_millis),
        }
    }
}

impl From<&Twin> for StoredTwin {
    fn from(t: &Twin) -> Self {
        Self {
            device_id: t.device_id.clone(),
            module_id: t.module_id.clone(),
            version: t.version,
            tags: t.tags.clone(),
            desired: (&t.desired).into(),
            reported: (&t.reported).into(),
        }
    }
}

impl From<StoredTwin> for Twin {
    fn from(s: StoredTwin) -> Self {
        Twin {
            device_id: s.device_id,
            module_id: s.module_id,
            version: s.version,
            tags: s.tags,
            desired: s.desired.into(),
            reported: s.reported.into(),
        }
    }
}

/// RFC 7386 merge of a tags patch into the current tags (`null` deletes).
pub(crate) fn merge_tags(current: &Map<String, Value>, patch: &Map<String, Value>) -> Value {
    fn merge(t: &mut Map<String, Value>, p: &Map<String, Value>) {
        for (k, v) in p {
            match v {
                Value::Null => {
                    t.remove(k);
                }
                Value::Object(po) => {
                    let e = t
                        .entry(k.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !e.is_object() {
                        *e = Value::Object(Map::new());
                    }
                    if let Value::Object(eo) = e {
                        merge(eo, po);
                    }
                }
                other => {
                    t.insert(k.clone(), other.clone());
                }
            }
        }
    }
    let mut t = current.clone();
    merge(&mut t, patch);
    Value::Object(t)
}

/// The desired-properties patch a device gets when its desired properties
/// are replaced wholesale (a deployment, a twin PUT): the JSON merge patch
/// from `old` to `new`, where a removed key is `null` — sending the new
/// document alone would be merged by the device and keep removed keys (a
/// deleted route would stay in force) — plus the new `$version`.
pub(crate) fn replacement_patch(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    version: u64,
) -> Value {
    let mut p = verge_core::twin::merge_diff(old, new);
    p.insert("$version".into(), Value::from(version));
    Value::Object(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_twin_round_trips() {
        let mut t = Twin::new("d", Some("m".into()));
        t.patch_desired(&json!({"a": {"b": 1}}), Timestamp::from_millis(5))
            .unwrap();
        t.patch_reported(&json!({"r": true}), Timestamp::from_millis(6))
            .unwrap();
        t.replace_tags(&json!({"site": "x"})).unwrap();
        let s = serde_json::to_vec(&StoredTwin::from(&t)).unwrap();
        let back: Twin = serde_json::from_slice::<StoredTwin>(&s).unwrap().into();
        assert_eq!(back, t);
    }

    #[test]
    fn replacement_patch_nulls_removals_and_applies_to_the_new_document() {
        let old =
            json!({"routes": {"a": "x", "b": "y"}, "keep": 1, "gone": {"z": 1}, "o": {"p": 1}});
        let new = json!({"routes": {"a": "x2", "c": "w"}, "keep": 1, "o": 5});
        let p = replacement_patch(old.as_object().unwrap(), new.as_object().unwrap(), 7);
        assert_eq!(
            p,
            json!({"gone": null, "routes": {"b": null, "a": "x2", "c": "w"}, "o": 5, "$version": 7})
        );
        // Merged into the old document (as a device does), it gives the new one.
        let mut patch = p.as_object().unwrap().clone();
        patch.remove("$version");
        assert_eq!(merge_tags(old.as_object().unwrap(), &patch), new);
        // Nothing changed: the version alone.
        assert_eq!(
            replacement_patch(new.as_object().unwrap(), new.as_object().unwrap(), 8),
            json!({"$version": 8})
        );
    }

    #[test]
    fn tag_merge() {
        let cur = json!({"a": 1, "o": {"x": 1, "y": 2}});
        let p = json!({"a": null, "o": {"y": 3}, "n": "v"});
        assert_eq!(
            merge_tags(cur.as_object().unwrap(), p.as_object().unwrap()),
            json!({"o": {"x": 1, "y": 3}, "n": "v"})
        );
    }
}
