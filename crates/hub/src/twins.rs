//! Twins kept by the hub, persisted in the storage directory, and the local
//! source of desired properties (a JSON file polled for changes).
//!
//! Each twin is its own file (`twins/<sha256 of the id>.json`, written
//! atomically and fsync'd before a change is acknowledged), so a reported
//! patch costs one small write whatever the number of twins. A reported
//! patch that cannot be saved is refused (500), and the twin is left as it
//! was. The older single `twins.json` is split into the directory at start;
//! a damaged file is moved aside (see `verge_files::load_json`).
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
use verge_core::twin::{Twin, TwinError, TwinSection, merge_diff};

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

/// One twin's file.
#[derive(Serialize, Deserialize)]
struct SavedFile {
    id: String,
    #[serde(flatten)]
    twin: SavedTwin,
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
#[derive(Default, Clone)]
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

/// Why a reported patch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch itself is refused (400).
    #[error(transparent)]
    Refused(#[from] TwinError),
    /// It could not be saved; nothing changed (500).
    #[error("the twin could not be saved: {0}")]
    NotSaved(std::io::Error),
}

/// Every twin, keyed by client id (`d` or `d/m`).
pub struct Twins {
    inner: Mutex<HashMap<String, Entry>>,
    dir: PathBuf,
    /// Held from a change to its file's fsync: writes of one twin's file
    /// happen in the order of its changes.
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
    /// Loads the twins saved in `dir` (created 0700 if missing; the older
    /// `<dir>.json` is split into it).
    pub async fn open(dir: PathBuf) -> anyhow::Result<Self> {
        let d = dir.clone();
        let saved = tokio::task::spawn_blocking(move || load_dir(&d)).await??;
        let map: HashMap<String, Entry> = saved
            .into_iter()
            .map(|(id, s)| {
                let e = entry_from(&id, s);
                (id, e)
            })
            .collect();
        Ok(Self {
            inner: Mutex::new(map),
            dir,
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
        let _save = self.save.lock().await;
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
            self.persist(id).await;
        }
    }

    /// Applies a desired patch (with `$version`) received from the cloud.
    pub async fn cloud_desired_patch(&self, id: &str, patch: &Value) -> CloudPatch {
        let _save = self.save.lock().await;
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
            self.persist(id).await;
        }
        out
    }

    /// Takes the cloud's twin (client form, from a GET) as the truth:
    /// desired properties are replaced, returning the diff patch to push
    /// (changed and removed keys, with the cloud's `$version`) if they
    /// changed; reported properties become the cloud's with the patches
    /// still queued applied on top.
    pub async fn cloud_twin(&self, id: &str, body: &Value) -> Option<(Value, u64)> {
        let _save = self.save.lock().await;
        let (desired, dv) = client_section(body.get("desired"));
        let (reported, rv) = client_section(body.get("reported"));
        let push = {
            let mut map = lock(&self.inner);
            let e = map.entry(id.to_owned()).or_insert_with(|| new_entry(id));
            let patch = merge_diff(&e.twin.desired.properties, &desired);
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
        self.persist(id).await;
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
    ///
    /// If the twin cannot be saved, the patch is undone and
    /// [`PatchError::NotSaved`] returned (the client gets an error, not 204).
    pub async fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, PatchError> {
        let queue = self.is_synced(id);
        let _save = self.save.lock().await;
        let (v, before) = {
            let mut map = lock(&self.inner);
            let before = map.get(id).cloned();
            let e = map.entry(id.to_owned()).or_insert_with(|| new_entry(id));
            if queue && e.pending.len() >= MAX_PENDING_REPORTED {
                return Err(TwinError::TooLarge {
                    section: "reported (patches waiting for the cloud)",
                    size: e.pending.len(),
                    limit: MAX_PENDING_REPORTED,
                }
                .into());
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
            (v, before)
        };
        if let Err(e) = self.write_twin(id).await {
            let mut map = lock(&self.inner);
            match before {
                Some(b) => {
                    map.insert(id.to_owned(), b);
                }
                None => {
                    map.remove(id);
                }
            }
            tracing::error!(twin = id, error = %e, "reported patch refused: the twin cannot be saved");
            return Err(PatchError::NotSaved(e));
        }
        drop(_save);
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
        let _save = self.save.lock().await;
        let out = {
            let mut map = lock(&self.inner);
            let twin = &mut map
                .entry(id.to_owned())
                .or_insert_with(|| new_entry(id))
                .twin;
            let patch = merge_diff(&twin.desired.properties, desired);
            if patch.is_empty() {
                None
            } else {
                let patch = Value::Object(patch);
                let v = twin.patch_desired(&patch, Timestamp::now())?;
                Some((twin.desired_patch_message(&patch), v))
            }
        };
        if out.is_some() {
            self.persist(id).await;
        }
        Ok(out)
    }

    /// Saves `id`'s twin; a failure is logged (changes from the cloud are
    /// fetched again after a restart). Callers hold `save` since their change.
    async fn persist(&self, id: &str) {
        if let Err(e) = self.write_twin(id).await {
            tracing::error!(twin = id, error = %e, "cannot persist the twin");
        }
    }

    /// Writes `id`'s file as the twin is now (callers hold `save`).
    async fn write_twin(&self, id: &str) -> std::io::Result<()> {
        let bytes = {
            let map = lock(&self.inner);
            let Some(e) = map.get(id) else { return Ok(()) };
            serde_json::to_vec(&SavedFile {
                id: id.to_owned(),
                twin: saved_twin(e),
            })
            .map_err(std::io::Error::other)?
        };
        verge_files::write_atomic_async(twin_file(&self.dir, id), bytes).await
    }
}

fn twin_file(dir: &std::path::Path, id: &str) -> PathBuf {
    dir.join(verge_files::keyed_file_name(id, "json"))
}

fn saved_twin(e: &Entry) -> SavedTwin {
    let t = &e.twin;
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
    }
}

fn entry_from(id: &str, s: SavedTwin) -> Entry {
    let mut t = new_twin(id);
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
    Entry {
        twin: t,
        pending,
        next_seq,
    }
}

/// Reads every twin file of `dir` and migrates `<dir>.json` (blocking).
#[expect(
    clippy::disallowed_methods,
    reason = "runs in spawn_blocking (Twins::open)"
)]
fn load_dir(dir: &std::path::Path) -> std::io::Result<Vec<(String, SavedTwin)>> {
    verge_files::create_private_dir(dir)?;
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        if let Some(f) = verge_files::load_json::<SavedFile>(&path)? {
            out.push((f.id, f.twin));
        }
    }
    let legacy = dir.with_extension("json");
    if let Some(saved) = verge_files::load_json::<BTreeMap<String, SavedTwin>>(&legacy)? {
        for (id, twin) in saved {
            let f = SavedFile { id, twin };
            let bytes = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
            verge_files::write_atomic(&twin_file(dir, &f.id), &bytes)?;
            out.push((f.id, f.twin));
        }
        verge_files::remove_durable(&legacy)?;
        tracing::info!(file = %legacy.display(), dir = %dir.display(), "twins moved to one file each");
    }
    Ok(out)
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
    #![allow(clippy::disallowed_methods)]
    use super::*;
    use serde_json::json;

    async fn open(dir: &tempfile::TempDir) -> Twins {
        let t = Twins::open(dir.path().join("twins")).await.unwrap();
        t.sync_upstream(["d/m".to_owned()]);
        t
    }

    fn twin_files(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// A reported patch writes its own twin's file and leaves the others'
    /// alone (before: every twin was rewritten and fsync'd).
    #[tokio::test]
    async fn a_patch_rewrites_one_twin_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        for id in ["d/m", "d/n", "e"] {
            t.patch_reported(id, &json!({"a": 1})).await.unwrap();
        }
        let files = twin_files(&dir.path().join("twins"));
        assert_eq!(files.len(), 3);
        let other = twin_file(&dir.path().join("twins"), "e");
        let sentinel = br#"{"id":"e","version":7,"desired":{"properties":{},"version":0},"reported":{"properties":{"sentinel":true},"version":1}}"#;
        std::fs::write(&other, sentinel).unwrap();
        t.patch_reported("d/m", &json!({"a": 2})).await.unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), sentinel);
        drop(t);
        let t = open(&dir).await;
        assert_eq!(t.client_json("d/m")["reported"]["a"], json!(2));
        assert_eq!(t.client_json("e")["reported"]["sentinel"], json!(true));
    }

    /// A patch that cannot be saved is refused and leaves the twin as it was
    /// (before: the client got 204 and the patch lived only in memory).
    #[tokio::test]
    async fn a_patch_that_cannot_be_saved_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir).await;
        t.patch_reported("d/m", &json!({"a": 1})).await.unwrap();
        // The directory is gone: the next write fails.
        std::fs::remove_dir_all(dir.path().join("twins")).unwrap();
        let e = t.patch_reported("d/m", &json!({"a": 2})).await.unwrap_err();
        assert!(matches!(e, PatchError::NotSaved(_)), "{e}");
        assert_eq!(t.client_json("d/m")["reported"]["a"], json!(1));
        assert_eq!(t.pending_reported("d/m"), 1);
        let e = t.patch_reported("new", &json!({"a": 2})).await.unwrap_err();
        assert!(matches!(e, PatchError::NotSaved(_)), "{e}");
        // A refused patch is still a 400-kind error.
        std::fs::create_dir(dir.path().join("twins")).unwrap();
        let e = t.patch_reported("d/m", &json!(5)).await.unwrap_err();
        assert!(matches!(e, PatchError::Refused(_)), "{e}");
        t.patch_reported("d/m", &json!({"a": 3})).await.unwrap();
    }

    /// The single `twins.json` of earlier versions is split into files.
    #[tokio::test]
    async fn the_single_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("twins.json"),
            br#"{"d/m": {"version": 3, "desired": {"properties": {"x": 1}, "version": 2}, "reported": {"properties": {"y": 2}, "version": 1}}}"#,
        )
        .unwrap();
        let t = open(&dir).await;
        assert_eq!(t.desired("d/m").unwrap()["x"], json!(1));
        assert_eq!(t.client_json("d/m")["reported"]["y"], json!(2));
        assert!(!dir.path().join("twins.json").exists());
        assert_eq!(twin_files(&dir.path().join("twins")).len(), 1);
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
        assert!(
            matches!(e, Err(PatchError::Refused(TwinError::TooLarge { .. }))),
            "{e:?}"
        );
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
}
