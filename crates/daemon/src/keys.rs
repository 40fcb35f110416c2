//! The device key on disk and the module identities verged manages.
//!
//! * The device key lives in `<homedir>/keys/device.key` (base64, mode 0600).
//! * Module identities `{moduleId, generationId, managedBy, authType}` live in
//!   `<homedir>/identities.json`, rewritten atomically (temp file, fsync,
//!   rename, fsync of the directory).
//! * Module keys are never stored: they are
//!   `device_key.derive_module_key(module, generation_id)`, so the hub and the
//!   cloud, which know the device key, compute the same keys.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use verge_core::id::ModuleId;
use verge_core::sas::SharedAccessKey;

/// Errors from the key and identity stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The stored file is corrupt.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An identity with that id exists.
    #[error("identity {0} already exists")]
    AlreadyExists(String),
    /// No identity with that id.
    #[error("identity {0} not found")]
    NotFound(String),
    /// The module id is invalid.
    #[error("{0}")]
    InvalidId(String),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably with the given mode
/// (blocking), creating its directory.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    verge_files::write_atomic_mode(path, bytes, mode).map_err(io_err("writing", path))
}

/// Stores the provisioned device key at `<homedir>/keys/device.key` (0600) and
/// returns it. The configured key always wins: if the stored one differs
/// (re-provisioned device) it is replaced and a warning is logged.
pub fn store_device_key(homedir: &Path, key: &SharedAccessKey) -> Result<PathBuf, StoreError> {
    let path = homedir.join("keys").join("device.key");
    let keys_dir = homedir.join("keys");
    std::fs::create_dir_all(&keys_dir).map_err(io_err("creating", &keys_dir))?;
    let _ = std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(0o700));
    let encoded = key.to_base64();
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing.trim() == encoded => {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err("chmod", &path))?;
            return Ok(path);
        }
        Ok(_) => tracing::warn!(
            path = %path.display(),
            "stored device key differs from the configured one; replacing it (device re-provisioned)"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", &path)(e)),
    }
    atomic_write(&path, encoded.as_bytes(), 0o600)?;
    Ok(path)
}

/// The key module keys derive from on a device without a symmetric key of
/// its own (X.509): the one kept at `<homedir>/keys/device.key` (so module
/// keys survive restarts, and a device moved from SAS to X.509 keeps its
/// modules' keys), else 32 random bytes stored there (0600).
pub fn load_or_create_device_key(homedir: &Path) -> Result<SharedAccessKey, StoreError> {
    let path = homedir.join("keys").join("device.key");
    match read_device_key(&path) {
        Ok(k) => return Ok(k),
        Err(StoreError::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
        }
        Err(e) => return Err(e),
    }
    let mut bytes = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        StoreError::Corrupt {
            path: path.clone(),
            reason: "no randomness for a new key".into(),
        }
    })?;
    let key = SharedAccessKey::from_bytes(bytes);
    store_device_key(homedir, &key)?;
    Ok(key)
}

/// Reads a device key file written by [`store_device_key`].
pub fn read_device_key(path: &Path) -> Result<SharedAccessKey, StoreError> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    SharedAccessKey::from_base64(&text).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The system modules' identity ids and runtime names differ (`$edgeHub` vs `edgeHub`).
/// Maps either form to the identity id.
pub fn canonical_module_id(name: &str) -> String {
    match name {
        "edgeAgent" | "$edgeAgent" => "$edgeAgent".to_owned(),
        "edgeHub" | "$edgeHub" => "$edgeHub".to_owned(),
        other => other.to_owned(),
    }
}

/// The runtime name (and socket file name) for an identity id: without the `$`.
pub fn runtime_name(module_id: &str) -> &str {
    module_id.strip_prefix('$').unwrap_or(module_id)
}

/// A module identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleIdentity {
    /// Identity id (`$edgeHub`, `filter`).
    pub module_id: String,
    /// Generation id; changes when the identity is recreated or rotated.
    pub generation_id: String,
    /// Who manages it (`iotedge`, …).
    pub managed_by: String,
    /// Always `Sas` here.
    pub auth_type: String,
}

/// A deleted identity the cloud may still hold (see [`IdentityStore::deleted`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tombstone {
    /// The deleted identity's id.
    pub module_id: String,
    /// Its generation id when deleted: tells this deletion from a later one.
    pub generation_id: String,
}

/// At most this many deletions wait for the cloud; beyond, the oldest is
/// dropped (its cloud identity stays until deleted by hand).
pub const MAX_TOMBSTONES: usize = 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct IdentityFile {
    identities: Vec<ModuleIdentity>,
    /// Deletions not yet done in the cloud (absent in older files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deleted: Vec<Tombstone>,
}

#[derive(Debug, Clone, Default)]
struct Identities {
    map: BTreeMap<String, ModuleIdentity>,
    deleted: Vec<Tombstone>,
}

/// Records a deletion (replacing an older one of the same id), keeping at most `max`.
fn push_tombstone(deleted: &mut Vec<Tombstone>, t: Tombstone, max: usize) {
    deleted.retain(|d| d.module_id != t.module_id);
    deleted.push(t);
    while deleted.len() > max {
        let dropped = deleted.remove(0);
        tracing::warn!(module = %dropped.module_id,
            "too many identity deletions wait for the cloud; forgetting the oldest");
    }
}

/// The persisted module identities.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    path: PathBuf,
    device_key: SharedAccessKey,
    inner: Arc<tokio::sync::Mutex<Identities>>,
    last_gen: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped after every persisted create, update or delete, so the cloud
    /// registration (see `cloud_identities`) follows without being called.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// .NET ticks at the Unix epoch (generation ids look like aziot's 18-digit ones).
const TICKS_AT_UNIX_EPOCH: u64 = 621_355_968_000_000_000;

impl IdentityStore {
    /// Opens (blocking; call at startup) `<homedir>/identities.json`.
    pub fn open(homedir: &Path, device_key: SharedAccessKey) -> Result<Self, StoreError> {
        let path = homedir.join("identities.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: IdentityFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                Identities {
                    map: file
                        .identities
                        .into_iter()
                        .map(|i| (i.module_id.clone(), i))
                        .collect(),
                    deleted: file.deleted,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Identities::default(),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        Ok(Self {
            path,
            device_key,
            inner: Arc::new(tokio::sync::Mutex::new(state)),
            last_gen: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    fn new_generation_id(&self) -> String {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() / 100);
        let now = u64::try_from(now).unwrap_or(u64::MAX / 2) + TICKS_AT_UNIX_EPOCH;
        let mut prev = self.last_gen.load(Ordering::SeqCst);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_gen
                .compare_exchange(prev, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next.to_string(),
                Err(p) => prev = p,
            }
        }
    }

    async fn persist(&self, state: &Identities) -> Result<(), StoreError> {
        let file = IdentityFile {
            identities: state.map.values().cloned().collect(),
            deleted: state.deleted.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || atomic_write(&path, &bytes, 0o600))
            .await
            .map_err(|e| StoreError::Io {
                what: "writing",
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    fn validate(module_id: &str) -> Result<String, StoreError> {
        let id = canonical_module_id(module_id);
        ModuleId::new(id.as_str()).map_err(|e| StoreError::InvalidId(e.to_string()))?;
        Ok(id)
    }

    /// Creates an identity; fails if it exists.
    pub async fn create(
        &self,
        module_id: &str,
        managed_by: &str,
    ) -> Result<ModuleIdentity, StoreError> {
        let id = Self::validate(module_id)?;
        let mut state = self.inner.lock().await;
        if state.map.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let identity = ModuleIdentity {
            module_id: id.clone(),
            generation_id: self.new_generation_id(),
            managed_by: managed_by.to_owned(),
            auth_type: "Sas".to_owned(),
        };
        let mut next = state.clone();
        // Re-created: the cloud gets the new identity, not a deletion.
        next.deleted.retain(|t| t.module_id != id);
        next.map.insert(id, identity.clone());
        self.persist(&next).await?;
        *state = next;
        self.changed();
        Ok(identity)
    }

    /// Returns the identity, creating it when missing.
    pub async fn get_or_create(
        &self,
        module_id: &str,
        managed_by: &str,
    ) -> Result<ModuleIdentity, StoreError> {
        match self.create(module_id, managed_by).await {
            Err(StoreError::AlreadyExists(id)) => {
                self.get(&id).await.ok_or(StoreError::NotFound(id))
            }
            other => other,
        }
    }

    /// Updates an identity: `managed_by` if given; the generation id is set to
    /// `generation_id` if given, otherwise a new one is minted (key rotation).
    pub async fn update(
        &self,
        module_id: &str,
        generation_id: Option<&str>,
        managed_by: Option<&str>,
    ) -> Result<ModuleIdentity, StoreError> {
        let id = Self::validate(module_id)?;
        let mut state = self.inner.lock().await;
        let Some(current) = state.map.get(&id).cloned() else {
            return Err(StoreError::NotFound(id));
        };
        let updated = ModuleIdentity {
            generation_id: generation_id
                .filter(|g| !g.is_empty())
                .map_or_else(|| self.new_generation_id(), str::to_owned),
            managed_by: managed_by.map_or(current.managed_by, str::to_owned),
            ..current
        };
        let mut next = state.clone();
        next.map.insert(id, updated.clone());
        self.persist(&next).await?;
        *state = next;
        self.changed();
        Ok(updated)
    }

    /// Deletes an identity.
    pub async fn delete(&self, module_id: &str) -> Result<ModuleIdentity, StoreError> {
        let id = canonical_module_id(module_id);
        let mut state = self.inner.lock().await;
        let mut next = state.clone();
        let Some(removed) = next.map.remove(&id) else {
            return Err(StoreError::NotFound(id));
        };
        push_tombstone(
            &mut next.deleted,
            Tombstone {
                module_id: id,
                generation_id: removed.generation_id.clone(),
            },
            MAX_TOMBSTONES,
        );
        self.persist(&next).await?;
        *state = next;
        self.changed();
        Ok(removed)
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that changes after every create, update or delete.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Deleted identities the cloud may still hold, oldest first.
    pub async fn deleted(&self) -> Vec<Tombstone> {
        self.inner.lock().await.deleted.clone()
    }

    /// Forgets deletions done in the cloud. Only exact matches go: a
    /// tombstone written since (the id re-created and deleted again) stays.
    pub async fn forget_deleted(&self, done: &[Tombstone]) -> Result<(), StoreError> {
        let mut state = self.inner.lock().await;
        if !state.deleted.iter().any(|t| done.contains(t)) {
            return Ok(());
        }
        let mut next = state.clone();
        next.deleted.retain(|t| !done.contains(t));
        self.persist(&next).await?;
        *state = next;
        Ok(())
    }

    /// One identity (either name form).
    pub async fn get(&self, module_id: &str) -> Option<ModuleIdentity> {
        self.inner
            .lock()
            .await
            .map
            .get(&canonical_module_id(module_id))
            .cloned()
    }

    /// All identities, by id.
    pub async fn list(&self) -> Vec<ModuleIdentity> {
        self.inner.lock().await.map.values().cloned().collect()
    }

    /// The module's SAS key: derived from the device key, never stored.
    pub fn module_key(&self, identity: &ModuleIdentity) -> Result<SharedAccessKey, StoreError> {
        let id = ModuleId::new(identity.module_id.as_str())
            .map_err(|e| StoreError::InvalidId(e.to_string()))?;
        Ok(self
            .device_key
            .derive_module_key(&id, &identity.generation_id))
    }

    /// The device key.
    pub fn device_key(&self) -> &SharedAccessKey {
        &self.device_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SharedAccessKey {
        SharedAccessKey::from_bytes(vec![7u8; 32])
    }

    #[test]
    fn device_key_is_0600_and_replaced_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = store_device_key(dir.path(), &key()).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_device_key(&p).unwrap(), key());
        let other = SharedAccessKey::from_bytes(vec![9u8; 32]);
        store_device_key(dir.path(), &other).unwrap();
        assert_eq!(read_device_key(&p).unwrap(), other);
    }

    #[tokio::test]
    async fn identities_persist_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::open(dir.path(), key()).unwrap();
        let a = store.create("modA", "iotedge").await.unwrap();
        assert_eq!(a.auth_type, "Sas");
        assert!(matches!(
            store.create("modA", "x").await,
            Err(StoreError::AlreadyExists(_))
        ));
        let hub = store.create("edgeHub", "iotedge").await.unwrap();
        assert_eq!(hub.module_id, "$edgeHub");
        assert!(store.create("bad/id", "x").await.is_err());

        let reopened = IdentityStore::open(dir.path(), key()).unwrap();
        assert_eq!(reopened.list().await.len(), 2);
        assert_eq!(reopened.get("modA").await.unwrap(), a);

        let k1 = store.module_key(&a).unwrap();
        assert_eq!(
            k1,
            key().derive_module_key(&ModuleId::new("modA").unwrap(), &a.generation_id)
        );
        let b = store.update("modA", None, Some("me")).await.unwrap();
        assert_ne!(b.generation_id, a.generation_id);
        assert_eq!(b.managed_by, "me");
        assert_ne!(store.module_key(&b).unwrap(), k1);
        let c = store.update("modA", Some("42"), None).await.unwrap();
        assert_eq!(c.generation_id, "42");

        store.delete("modA").await.unwrap();
        assert!(matches!(
            store.delete("modA").await,
            Err(StoreError::NotFound(_))
        ));
        let reopened = IdentityStore::open(dir.path(), key()).unwrap();
        assert_eq!(reopened.list().await.len(), 1);
        let mode = std::fs::metadata(dir.path().join("identities.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn deletions_are_remembered_until_done_and_changes_notified() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::open(dir.path(), key()).unwrap();
        let mut rx = store.subscribe();
        let a = store.create("modA", "iotedge").await.unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        store.update("modA", None, None).await.unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        let a2 = store.delete("modA").await.unwrap();
        assert!(rx.has_changed().unwrap());
        assert_ne!(a.generation_id, a2.generation_id);
        let t1 = Tombstone {
            module_id: "modA".into(),
            generation_id: a2.generation_id.clone(),
        };
        assert_eq!(store.deleted().await, vec![t1.clone()]);
        // Persisted: a restart still knows.
        let reopened = IdentityStore::open(dir.path(), key()).unwrap();
        assert_eq!(reopened.deleted().await, vec![t1.clone()]);
        // Re-created: no deletion pending.
        store.create("modA", "iotedge").await.unwrap();
        assert!(store.deleted().await.is_empty());
        let gone = store.delete("modA").await.unwrap();
        let t2 = Tombstone {
            module_id: "modA".into(),
            generation_id: gone.generation_id,
        };
        // An older deletion confirmed does not clear the newer one.
        store.forget_deleted(&[t1]).await.unwrap();
        assert_eq!(store.deleted().await, vec![t2.clone()]);
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        store.forget_deleted(&[t2]).await.unwrap();
        assert!(store.deleted().await.is_empty());
        assert!(!rx.has_changed().unwrap(), "forgetting is not a change");
        let reopened = IdentityStore::open(dir.path(), key()).unwrap();
        assert!(reopened.deleted().await.is_empty());
    }

    #[test]
    fn tombstones_are_bounded_and_one_per_id() {
        let t = |m: &str, g: &str| Tombstone {
            module_id: m.into(),
            generation_id: g.into(),
        };
        let mut d = Vec::new();
        for (m, g) in [("a", "1"), ("b", "1"), ("a", "2"), ("c", "1"), ("d", "1")] {
            push_tombstone(&mut d, t(m, g), 3);
        }
        assert_eq!(d, vec![t("a", "2"), t("c", "1"), t("d", "1")]);
    }

    #[test]
    fn generation_ids_are_increasing() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::open(dir.path(), key()).unwrap();
        let a: u64 = store.new_generation_id().parse().unwrap();
        let b: u64 = store.new_generation_id().parse().unwrap();
        assert!(b > a);
        assert_eq!(a.to_string().len(), 18);
    }
}
