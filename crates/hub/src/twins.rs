//! Twins kept by the hub, persisted as JSON in the storage directory, and the
//! local source of desired properties (a JSON file polled for changes until the
//! cloud link exists).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use verge_core::time::Timestamp;
use verge_core::twin::{Twin, TwinError, TwinSection};

use crate::session::write_atomic;

#[derive(Serialize, Deserialize, Default)]
struct SavedSection {
    properties: Map<String, Value>,
    version: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct SavedTwin {
    version: u64,
    desired: SavedSection,
    reported: SavedSection,
}

/// Every twin, keyed by client id (`d` or `d/m`).
pub struct Twins {
    inner: Mutex<HashMap<String, Twin>>,
    path: PathBuf,
    save: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_twin(id: &str) -> Twin {
    match id.split_once('/') {
        Some((d, m)) => Twin::new(d, Some(m.to_owned())),
        None => Twin::new(id, None),
    }
}

impl Twins {
    /// Loads the twins saved at `path`.
    pub async fn open(path: PathBuf) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let saved: BTreeMap<String, SavedTwin> = serde_json::from_slice(&bytes)?;
                for (id, s) in saved {
                    let mut t = new_twin(&id);
                    t.version = s.version;
                    t.desired = TwinSection {
                        properties: s.desired.properties,
                        version: s.desired.version,
                        ..TwinSection::default()
                    };
                    t.reported = TwinSection {
                        properties: s.reported.properties,
                        version: s.reported.version,
                        ..TwinSection::default()
                    };
                    map.insert(id, t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Self {
            inner: Mutex::new(map),
            path,
            save: tokio::sync::Mutex::new(()),
        })
    }

    /// The device-side GET body (`{desired, reported}` with `$version`s).
    pub fn client_json(&self, id: &str) -> Value {
        let mut map = lock(&self.inner);
        map.entry(id.to_owned())
            .or_insert_with(|| new_twin(id))
            .to_client_json()
    }

    /// `id`'s desired properties (`None` when there is no such twin).
    pub fn desired(&self, id: &str) -> Option<Map<String, Value>> {
        lock(&self.inner)
            .get(id)
            .map(|t| t.desired.properties.clone())
    }

    /// The `$version` of `id`'s desired properties (0 when there is no such twin).
    pub fn desired_version(&self, id: &str) -> u64 {
        lock(&self.inner).get(id).map_or(0, |t| t.desired.version)
    }

    /// Merges a reported patch; returns the new reported version.
    pub async fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, TwinError> {
        let v = {
            let mut map = lock(&self.inner);
            map.entry(id.to_owned())
                .or_insert_with(|| new_twin(id))
                .patch_reported(patch, Timestamp::now())?
        };
        self.persist().await;
        Ok(v)
    }

    /// Brings `id`'s desired properties to `desired`; returns the patch message
    /// to push (`patch + $version`) and the new version, or `None` if nothing changed.
    pub async fn set_desired(
        &self,
        id: &str,
        desired: &Map<String, Value>,
    ) -> Result<Option<(Value, u64)>, TwinError> {
        let out = {
            let mut map = lock(&self.inner);
            let twin = map.entry(id.to_owned()).or_insert_with(|| new_twin(id));
            let patch = diff(&twin.desired.properties, desired);
            if patch.is_empty() {
                None
            } else {
                let patch = Value::Object(patch);
                let v = twin.patch_desired(&patch, Timestamp::now())?;
                Some((twin.desired_patch_message(&patch), v))
            }
        };
        if out.is_some() {
            self.persist().await;
        }
        Ok(out)
    }

    async fn persist(&self) {
        let _guard = self.save.lock().await;
        let bytes = {
            let map = lock(&self.inner);
            let saved: BTreeMap<&String, SavedTwin> = map
                .iter()
                .map(|(k, t)| {
                    (
                        k,
                        SavedTwin {
                            version: t.version,
                            desired: SavedSection {
                                properties: t.desired.properties.clone(),
                                version: t.desired.version,
                            },
                            reported: SavedSection {
                                properties: t.reported.properties.clone(),
                                version: t.reported.version,
                            },
                        },
                    )
                })
                .collect();
            serde_json::to_vec_pretty(&saved).unwrap_or_default()
        };
        if let Err(e) = write_atomic(&self.path, &bytes).await {
            tracing::error!(path = %self.path.display(), error = %e, "cannot persist twins");
        }
    }
}

/// The JSON merge patch that turns `old` into `new`.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
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
                out.insert(k.clone(), Value::Object(diff(o, n)));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Polls the desired-properties file and pushes changes to subscribed clients.
pub async fn run_desired_source(state: Arc<crate::HubState>, path: PathBuf) {
    let mut last: Option<Vec<u8>> = None;
    let period = Duration::from_millis(state.cfg.limits.twins_poll_ms.max(50));
    loop {
        match tokio::fs::read(&path).await {
            Ok(bytes) if last.as_ref() != Some(&bytes) => {
                match serde_json::from_slice::<BTreeMap<String, Map<String, Value>>>(&bytes) {
                    Ok(all) => {
                        for (id, desired) in all {
                            apply_desired(&state, &id, &desired).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "bad twins file");
                    }
                }
                last = Some(bytes);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read twins file"),
        }
        tokio::time::sleep(period).await;
    }
}

/// Sets `id`'s desired properties and pushes the patch if the client listens.
pub async fn apply_desired(state: &crate::HubState, id: &str, desired: &Map<String, Value>) {
    if id == state.edgehub_twin_id() {
        // The hub's own twin: its desired properties are its configuration,
        // checked and stored by the one path every configuration source takes.
        if state.twins.desired(id).as_ref() == Some(desired) {
            return;
        }
        match state
            .set_edgehub_desired(&Value::Object(desired.clone()))
            .await
        {
            Ok(n) => tracing::info!(routes = n, "$edgeHub twin changed; new routes applied"),
            Err(e) => {
                tracing::error!(error = %e, "$edgeHub twin refused; previous routes stay active");
            }
        }
        return;
    }
    match state.twins.set_desired(id, desired).await {
        Ok(Some((msg, version))) => {
            let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
            if let Some(conn) = state.sessions.deliverable(id, &topic) {
                let out = crate::session::Outbound {
                    topic,
                    payload: serde_json::to_vec(&msg).unwrap_or_default().into(),
                    ack: None,
                };
                if tokio::time::timeout(Duration::from_secs(5), conn.tx.send(out))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        client = id,
                        "desired patch not pushed: client is not reading"
                    );
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(client = id, error = %e, "desired properties refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_is_a_merge_patch() {
        let old = json!({"a": 1, "b": {"x": 1, "y": 2}, "gone": true});
        let new = json!({"a": 1, "b": {"x": 1, "y": 3}, "c": "new"});
        let (Value::Object(o), Value::Object(n)) = (old, new) else {
            unreachable!()
        };
        assert_eq!(
            Value::Object(diff(&o, &n)),
            json!({"gone": null, "b": {"y": 3}, "c": "new"})
        );
    }
}
