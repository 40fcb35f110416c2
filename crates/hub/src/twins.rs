//! Twins kept by the hub, persisted as JSON in the storage directory, and the
//! local source of desired properties (a JSON file polled for changes).
//!
//! With an upstream, the hub's twins are caches of the cloud's:
//!
//! * Reported patches are answered locally (204) and also queued, in order,
//!   per identity, in the same file as the twin (so a hub restart keeps
//!   them); the identity's upstream link sends them one at a time and
//!   removes each after the cloud's answer ([`Twins::next_reported`],
//!   [`Twins::reported_done`]). The queue is bounded: beyond
//!   [`MAX_PENDING_REPORTED`] patches a new one is refused (400 to the
//!   client), pushing back instead of growing.
//! * Desired properties come from the cloud: its patches are applied in
//!   `$version` order ([`Twins::cloud_desired_patch`]; a gap asks for a
//!   full GET), and a full twin GET after every (re)connect replaces the
//!   cached desired properties, yielding the diff to push to the client
//!   ([`Twins::cloud_twin`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;
use verge_core::time::Timestamp;
use verge_core::twin::{Twin, TwinError, TwinSection};

use crate::lock;

/// Reported patches queued per identity for the cloud, at most.
pub const MAX_PENDING_REPORTED: usize = 200;

#[derive(Serialize, Deserialize, Default)]
struct SavedSection {
    properties: Map<String, Value>,
    version: u64,
}

/// A reported patch accepted locally, not yet confirmed by the cloud.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PendingReported {
    /// Position in the identity's queue (increasing, never reused).
    pub seq: u64,
    /// The patch as the client sent it.
    pub patch: Value,
}

#[derive(Serialize, Deserialize, Default)]
struct SavedTwin {
    version: u64,
    desired: SavedSection,
    reported: SavedSection,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_reported: Vec<PendingReported>,
    #[serde(default)]
    next_seq: u64,
}

/// One twin and its queue of reported patches for the cloud.
#[derive(Default)]
struct Entry {
    twin: Twin,
    pending: VecDeque<PendingReported>,
    next_seq: u64,
}

/// What to do with a desired patch from the cloud.
#[derive(Debug, PartialEq)]
pub enum CloudPatch {
    /// Applied: push this message (patch + `$version`) to the client.
    Push(Value, u64),
    /// Already applied (or older): nothing to do.
    Stale,
    /// Versions were skipped: GET the full twin.
    Gap,
}

/// Every twin, keyed by client id (`d` or `d/m`).
pub struct Twins {
    inner: Mutex<HashMap<String, Entry>>,
    path: PathBuf,
    save: tokio::sync::Mutex<()>,
    /// Identities whose reported patches are queued for the cloud (set
    /// when the hub has an upstream: those it holds credentials for).
    synced: Mutex<HashSet<String>>,
    /// Also synced: identities this predicate accepts (the hub's live key
    /// table, which grows with verged's identities and the device scope).
    synced_when: std::sync::RwLock<Option<SyncFilter>>,
    /// Bumped whenever a reported patch is queued (wakes the links).
    reported_tx: watch::Sender<u64>,
}

/// Decides whether an identity's reported patches go to the cloud.
pub type SyncFilter = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

fn new_twin(id: &str) -> Twin {
    match id.split_once('/') {
        Some((d, m)) => Twin::new(d, Some(m.to_owned())),
        None => Twin::new(id, None),
    }
}

fn new_entry(id: &str) -> Entry {
    Entry {
        twin: new_twin(id),
        ..Entry::default()
    }
}

/// A section's properties from a client-form section (`{…, "$version": n}`).
fn client_section(v: Option<&Value>) -> (Map<String, Value>, u64) {
    let mut props = match v {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let version = props
        .remove("$version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    props.remove("$metadata");
    (props, version)
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
                    let pending: VecDeque<PendingReported> = s.pending_reported.into();
                    let next_seq = s
                        .next_seq
                        .max(pending.back().map_or(0, |p| p.seq.saturating_add(1)));
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
                    map.insert(
                        id,
                        Entry {
                            twin: t,
                            pending,
                            next_seq,
                        },
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Self {
            inner: Mutex::new(map),
            path,
            save: tokio::sync::Mutex::new(()),
            synced: Mutex::new(HashSet::new()),
            synced_when: std::sync::RwLock::new(None),
            reported_tx: watch::Sender::new(0),
        })
    }

    /// From now on, reported patches of `ids` are also queued for the cloud.
    pub fn sync_upstream(&self, ids: impl IntoIterator<Item = String>) {
        lock(&self.synced).extend(ids);
    }

    /// From now on, reported patches of every identity `filter` accepts are
    /// also queued for the cloud (checked at each patch).
    pub fn sync_upstream_when(&self, filter: SyncFilter) {
        *self
            .synced_when
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(filter);
    }

    fn is_synced(&self, id: &str) -> bool {
        if lock(&self.synced).contains(id) {
            return true;
        }
        self.synced_when
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|f| f(id))
    }

    /// Changes whenever a reported patch is queued for the cloud.
    pub fn reported_watch(&self) -> watch::Receiver<u64> {
        self.reported_tx.subscribe()
    }

    /// True when `id` has reported patches waiting for the cloud.
    pub fn has_pending_reported(&self, id: &str) -> bool {
        lock(&self.inner)
            .get(id)
            .is_some_and(|e| !e.pending.is_empty())
    }

    /// How many reported patches of `id` wait for the cloud.
    pub fn pending_reported(&self, id: &str) -> usize {
        lock(&self.inner).get(id).map_or(0, |e| e.pending.len())
    }

    /// The oldest reported patch of `id` waiting for the cloud.
    pub fn next_reported(&self, id: &str) -> Option<PendingReported> {
        lock(&self.inner).get(id)?.pending.front().cloned()
    }

    /// The cloud answered reported patch `seq` of `id`: drop it from the queue.
    pub async fn reported_done(&self, id: &str, seq: u64) {
        let removed = {
            let mut map = lock(&self.inner);
            match map.get_mut(id) {
                Some(e) if e.pending.front().is_some_and(|p| p.seq == seq) => {
                    e.pending.pop_front();
                    true
                }
                _ => false,
            }
        };
        if removed {
            self.persist().await;
        }
    }

    /// Applies a desired patch (with `$version`) received from the cloud.
    pub async fn cloud_desired_patch(&self, id: &str, patch: &Value) -> CloudPatch {
        let (mut props, version) = client_section(Some(patch));
        props.retain(|k, _| !k.starts_with('$'));
        let out = {
            let mut map = lock(&self.inner);
            let e = map.entry(id.to_owned()).or_insert_with(|| new_entry(id));
            let have = e.twin.desired.version;
            if version <= have {
                CloudPatch::Stale
            } else if version != have + 1 {
                CloudPatch::Gap
            } else {
                let patch = Value::Object(props);
                match e.twin.patch_desired(&patch, Timestamp::now()) {
                    Ok(_) => {
                        e.twin.desired.version = version;
                        CloudPatch::Push(e.twin.desired_patch_message(&patch), version)
                    }
                    // The cloud accepted it, so it cannot be invalid; if it
                    // is, a full GET is the way to agree again.
                    Err(_) => CloudPatch::Gap,
                }
            }
        };
        if matches!(out, CloudPatch::Push(..)) {
            self.persist().await;
        }
        out
    }

    /// Takes the cloud's twin (client form, from a GET) as the truth:
    /// desired properties are replaced, returning the diff patch to push
    /// (changed and removed keys, with the cloud's `$version`) if they
    /// changed; reported properties become the cloud's with the patches
    /// still queued applied on top.
    pub async fn cloud_twin(&self, id: &str, body: &Value) -> Option<(Value, u64)> {
        let (desired, dv) = client_section(body.get("desired"));
        let (reported, rv) = client_section(body.get("reported"));
        let push = {
            let mut map = lock(&self.inner);
            let e = map.entry(id.to_owned()).or_insert_with(|| new_entry(id));
            let patch = diff(&e.twin.desired.properties, &desired);
            e.twin.desired = TwinSection {
                properties: desired,
                version: dv,
                ..TwinSection::default()
            };
            e.twin.reported = TwinSection {
                properties: reported,
                version: rv,
                ..TwinSection::default()
            };
            let now = Timestamp::now();
            for p in &e.pending {
                // They were valid when accepted; a patch that no longer is
                // stays queued and is the cloud's to refuse.
                let _ = e.twin.patch_reported(&p.patch, now);
            }
            e.twin.version += 1;
            (!patch.is_empty()).then(|| {
                let msg = e.twin.desired_patch_message(&Value::Object(patch));
                (msg, dv)
            })
        };
        self.persist().await;
        push
    }

    /// The device-side GET body (`{desired, reported}` with `$version`s).
    pub fn client_json(&self, id: &str) -> Value {
        let mut map = lock(&self.inner);
        map.entry(id.to_owned())
            .or_insert_with(|| new_entry(id))
            .twin
            .to_client_json()
    }

    /// `id`'s desired properties (`None` when there is no such twin).
    pub fn desired(&self, id: &str) -> Option<Map<String, Value>> {
        lock(&self.inner)
            .get(id)
            .map(|e| e.twin.desired.properties.clone())
    }

    /// The `$version` of `id`'s desired properties (0 when there is no such twin).
    pub fn desired_version(&self, id: &str) -> u64 {
        lock(&self.inner)
            .get(id)
            .map_or(0, |e| e.twin.desired.version)
    }

    /// Merges a reported patch; returns the new reported version. With an
    /// upstream the patch is also queued for the cloud (persisted before
    /// this returns, so the 204 the client gets means it survives a restart).
    pub async fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, TwinError> {
        let queue = self.is_synced(id);
        let v = {
            let mut map = lock(&self.inner);
            let e = map.entry(id.to_owned()).or_insert_with(|| new_entry(id));
            if queue && e.pending.len() >= MAX_PENDING_REPORTED {
                return Err(TwinError::TooLarge {
                    section: "reported (patches waiting for the cloud)",
                    size: e.pending.len(),
                    limit: MAX_PENDING_REPORTED,
                });
            }
            let v = e.twin.patch_reported(patch, Timestamp::now())?;
            if queue {
                let seq = e.next_seq;
                e.next_seq += 1;
                e.pending.push_back(PendingReported {
                    seq,
                    patch: patch.clone(),
                });
            }
            v
        };
        self.persist().await;
        if queue {
            self.reported_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
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
            let twin = &mut map
                .entry(id.to_owned())
                .or_insert_with(|| new_entry(id))
                .twin;
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
                .map(|(k, e)| {
                    let t = &e.twin;
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
                            pending_reported: e.pending.iter().cloned().collect(),
                            next_seq: e.next_seq,
                        },
                    )
                })
                .collect();
            serde_json::to_vec_pretty(&saved).unwrap_or_default()
        };
        if let Err(e) = write_durable(&self.path, &bytes).await {
            tracing::error!(path = %self.path.display(), error = %e, "cannot persist twins");
        }
    }
}

/// Writes `bytes` to `path` through a temporary file, fsynced before the
/// rename: a reported patch answered 204 is queued for the cloud, so it
/// must be on disk first (ack after fsync).
pub(crate) async fn write_durable(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let (path, bytes) = (path.to_owned(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
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
        Ok(Some((msg, version))) => push_desired(state, id, &msg, version).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(client = id, error = %e, "desired properties refused"),
    }
}

/// Pushes a desired patch message (patch + `$version`) to `id` if it is
/// connected and subscribed to desired patches; a client that is not
/// gets the whole twin when it next GETs it.
pub async fn push_desired(state: &crate::HubState, id: &str, msg: &Value, version: u64) {
    let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
    if let Some(conn) = state.sessions.deliverable(id, &topic) {
        let out = crate::session::Outbound {
            topic,
            // Serializing a Value cannot fail.
            payload: serde_json::to_vec(msg).unwrap_or_default().into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn open(dir: &tempfile::TempDir) -> Twins {
        let t = Twins::open(dir.path().join("twins.json")).await.unwrap();
        t.sync_upstream(["d/m".to_owned()]);
        t
    }

    #[tokio::test]
    async fn reported_patches_queue_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        t.patch_reported("d/m", &json!({"a": 1})).await.unwrap();
        t.patch_reported("d/m", &json!({"a": 2, "b": 1}))
            .await
            .unwrap();
        // Not synced with the cloud: applied, not queued.
        t.patch_reported("d/other", &json!({"x": 1})).await.unwrap();
        assert!(!t.has_pending_reported("d/other"));
        drop(t);

        let t = open(&dir).await;
        let first = t.next_reported("d/m").unwrap();
        assert_eq!(first.patch, json!({"a": 1}));
        // Only the head is removed, and only by its own seq.
        t.reported_done("d/m", first.seq + 1).await;
        assert_eq!(t.next_reported("d/m").unwrap(), first);
        t.reported_done("d/m", first.seq).await;
        let second = t.next_reported("d/m").unwrap();
        assert_eq!(second.patch, json!({"a": 2, "b": 1}));
        assert!(second.seq > first.seq);
        t.reported_done("d/m", second.seq).await;
        assert!(!t.has_pending_reported("d/m"));
        drop(t);
        assert!(!open(&dir).await.has_pending_reported("d/m"));
    }

    #[tokio::test]
    async fn the_reported_queue_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        for i in 0..MAX_PENDING_REPORTED {
            t.patch_reported("d/m", &json!({ "n": i })).await.unwrap();
        }
        let e = t.patch_reported("d/m", &json!({"n": -1})).await;
        assert!(matches!(e, Err(TwinError::TooLarge { .. })), "{e:?}");
        assert_eq!(
            t.client_json("d/m")["reported"]["n"],
            json!(MAX_PENDING_REPORTED - 1)
        );
    }

    #[tokio::test]
    async fn cloud_patches_apply_in_version_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        let p = t
            .cloud_desired_patch("d/m", &json!({"a": 1, "$version": 1}))
            .await;
        assert_eq!(p, CloudPatch::Push(json!({"a": 1, "$version": 1}), 1));
        assert_eq!(
            t.cloud_desired_patch("d/m", &json!({"a": 0, "$version": 1}))
                .await,
            CloudPatch::Stale
        );
        assert_eq!(
            t.cloud_desired_patch("d/m", &json!({"a": 3, "$version": 3}))
                .await,
            CloudPatch::Gap
        );
        assert_eq!(t.desired("d/m"), json!({"a": 1}).as_object().cloned());
    }

    #[tokio::test]
    async fn the_cloud_twin_yields_the_missed_diff_and_keeps_queued_reports() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        t.cloud_desired_patch(
            "d/m",
            &json!({"a": 1, "b": {"x": 1, "y": 2}, "$version": 1}),
        )
        .await;
        t.patch_reported("d/m", &json!({"mine": true}))
            .await
            .unwrap();
        let cloud = json!({
            "desired": {"b": {"x": 1, "z": 3}, "c": 4, "$version": 5},
            "reported": {"old": 1, "$version": 7},
        });
        let (msg, v) = t.cloud_twin("d/m", &cloud).await.unwrap();
        assert_eq!(v, 5);
        assert_eq!(
            msg,
            json!({"a": null, "b": {"y": null, "z": 3}, "c": 4, "$version": 5})
        );
        let twin = t.client_json("d/m");
        assert_eq!(twin["desired"], cloud["desired"]);
        assert_eq!(twin["reported"]["old"], json!(1));
        assert_eq!(
            twin["reported"]["mine"],
            json!(true),
            "queued patch re-applied"
        );
        assert!(t.has_pending_reported("d/m"));
        // The same twin again: nothing to push.
        assert!(t.cloud_twin("d/m", &cloud).await.is_none());
    }

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
