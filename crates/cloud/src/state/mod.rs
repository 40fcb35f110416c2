//! [`CloudState`]: the registry, twins, deployments, D2C log, C2D queues and
//! direct methods, behind one API that the service REST layer and the
//! (future) device endpoint both call.
//!
//! Concurrency: the registry (devices, modules, their twins and live
//! connection facts) is one in-memory map behind a mutex, written through to
//! fjall while the lock is held, so memory and disk change in the same order.
//! Writes sync to disk, so every mutating method is `async` and runs its
//! critical section on the blocking pool. Lock order: registry → c2d → conns;
//! `pending` is never held with another lock.
//!
//! Split by feature, each file adding an `impl CloudState` (and `impl Inner`)
//! block, so a change to one feature reads one file: `registry` (devices and
//! modules), `auth` (the device endpoint's checks), `twins` (twins and
//! deployments), `connections` (live connections and direct methods), `d2c`
//! and `c2d` (messaging, with C2D expiry). This file holds what they share:
//! the types, the locks, opening and closing.

mod auth;
mod c2d;
mod connections;
mod d2c;
mod registry;
mod twins;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
// Only the test hooks (`commit_delay`) hold a duration here.
#[cfg(test)]
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, oneshot};
use verge_core::time::Timestamp;
use verge_core::{ClientId, DeviceId, ModuleId, Twin};

use crate::c2d::{C2dQueues, Queued};
use crate::conn::{ConnEntry, MethodResponse};
use crate::d2c::D2cLog;
use crate::db::{Db, module_key};
use crate::error::{CloudError, Result};
use crate::registry::{ConnInfo, DeviceRecord, DeviceStatus, ModuleRecord};
use crate::twins::StoredTwin;
use fjall::OwnedWriteBatch;

/// The system modules every edge device has.
pub const SYSTEM_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];
/// `managedBy` of module identities a deployment created.
pub const MANAGED_BY_EDGE: &str = "IotEdge";
/// Capacity of the desired-patch broadcast (see [`CloudState::subscribe_desired`]).
pub const DESIRED_BROADCAST_CAPACITY: usize = 1024;

/// Where and as whom the cloud runs.
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// Directory for the database.
    pub data_dir: PathBuf,
    /// The hub's host name: the audience host of SAS tokens.
    pub hostname: String,
}

/// A desired-properties change, for observers other than the connection
/// itself (e.g. an upstream link of a nested hub).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredEvent {
    /// Whose twin changed.
    pub client: ClientId,
    /// The patch with `$version` (a replacement carries the full document).
    pub patch: Value,
}

/// A device identity with its live connection facts.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The stored identity.
    pub record: DeviceRecord,
    /// Connection facts.
    pub conn: ConnInfo,
}

impl DeviceInfo {
    /// The service API's `Device` JSON.
    pub fn to_json(&self) -> Value {
        self.record.to_json(&self.conn)
    }
}

/// A module identity with its live connection facts.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    /// The stored identity.
    pub record: ModuleRecord,
    /// Connection facts.
    pub conn: ConnInfo,
}

impl ModuleInfo {
    /// The service API's `Module` JSON.
    pub fn to_json(&self) -> Value {
        self.record.to_json(&self.conn)
    }
}

/// A twin with the identity facts the service API shows next to it.
#[derive(Debug, Clone)]
pub struct TwinInfo {
    /// The twin.
    pub twin: Twin,
    /// Its device.
    pub device: DeviceRecord,
    /// Connection facts of the twin's identity.
    pub conn: ConnInfo,
}

impl TwinInfo {
    /// The service API's `Twin` JSON.
    pub fn to_json(&self) -> Value {
        let mut v = self.twin.to_json();
        if let Value::Object(o) = &mut v {
            let d = &self.device;
            let status = if d.status == DeviceStatus::Enabled {
                "enabled"
            } else {
                "disabled"
            };
            let extra = json!({
                "deviceEtag": d.etag(),
                "status": status,
                "statusUpdateTime": d.to_json(&self.conn)["statusUpdatedTime"],
                "connectionState": if self.conn.connected { "Connected" } else { "Disconnected" },
                "lastActivityTime": d.to_json(&self.conn)["lastActivityTime"],
                "cloudToDeviceMessageCount": self.conn.c2d_count,
                "authenticationType": "sas",
                "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
                "modelId": "",
            });
            if let Value::Object(e) = extra {
                o.extend(e);
            }
            if self.twin.module_id.is_none() {
                o.insert("capabilities".into(), json!({ "iotEdge": d.iot_edge }));
                o.insert("deviceScope".into(), json!(d.device_scope));
                o.insert("parentScopes".into(), json!(d.parent_scopes));
            }
        }
        v
    }
}

struct ModuleEntry {
    rec: ModuleRecord,
    twin: Twin,
    conn: ConnInfo,
}

struct DeviceEntry {
    rec: DeviceRecord,
    twin: Twin,
    conn: ConnInfo,
    modules: BTreeMap<String, ModuleEntry>,
}

#[derive(Default)]
struct Registry {
    devices: BTreeMap<String, DeviceEntry>,
    /// Edge device scope → edge device id.
    scopes: HashMap<String, String>,
}

#[derive(Default)]
struct Conns {
    map: HashMap<ClientId, ConnEntry>,
    next_id: u64,
}

struct Pending {
    target: ClientId,
    tx: oneshot::Sender<MethodResponse>,
}

struct Inner {
    hostname: String,
    /// Where the state lives (the blob store is under it).
    data_dir: std::path::PathBuf,
    db: Db,
    /// Serializes registry and C2D writes. A writer holds it for the whole
    /// write (read, commit, apply), so what it read before its commit is
    /// still current after it; `reg` and `c2d` are only held for in-memory
    /// work, never across a commit's fsync, so CONNECT, authentication and
    /// telemetry (which take `reg` on tokio workers) never wait for a disk.
    /// Lock order: `writer`, then `reg`, then `c2d`.
    writer: Mutex<()>,
    reg: Mutex<Registry>,
    c2d: Mutex<C2dQueues>,
    conns: Mutex<Conns>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_rid: AtomicU64,
    conn_changed: Notify,
    desired_tx: broadcast::Sender<DesiredEvent>,
    d2c: D2cLog,
    /// CA certificates for `certificateAuthority` devices.
    certs: crate::certs::CaStore,
    closed: AtomicBool,
    /// Test hook: each registry or C2D commit first sleeps this long.
    #[cfg(test)]
    commit_delay: Mutex<Duration>,
    /// Test hook: true while a commit is held by `commit_delay`.
    #[cfg(test)]
    commit_held: AtomicBool,
}

/// The cloud's state and operations. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct CloudState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CloudState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudState")
            .field("hostname", &self.inner.hostname)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind (every write to
    // disk happens before the in-memory change), so keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn to_json_bytes<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| CloudError::Storage(format!("serialize: {e}")))
}

fn not_found_device(id: &str) -> CloudError {
    CloudError::NotFound(format!("device {id:?} is not registered"))
}

fn not_found_module(d: &str, m: &str) -> CloudError {
    CloudError::NotFound(format!("module {m:?} of device {d:?} is not registered"))
}

fn check_device_id(id: &str) -> Result<()> {
    DeviceId::new(id)
        .map(|_| ())
        .map_err(|e| CloudError::BadRequest(e.to_string()))
}

fn check_module_id(id: &str) -> Result<()> {
    ModuleId::new(id)
        .map(|_| ())
        .map_err(|e| CloudError::BadRequest(e.to_string()))
}

impl CloudState {
    /// Opens (or creates) the state under `options.data_dir`. Blocking: call
    /// it before serving, or on the blocking pool.
    pub fn open(options: CloudOptions) -> Result<Self> {
        let db = Db::open(&options.data_dir.join("db"))?;
        let mut reg = Registry::default();
        for kv in db.devices.iter() {
            let (_, v) = kv.into_inner()?;
            let rec: DeviceRecord = serde_json::from_slice(&v)
                .map_err(|e| CloudError::Storage(format!("device record: {e}")))?;
            let twin = load_twin(&db, rec.device_id.as_bytes())?
                .unwrap_or_else(|| Twin::new(rec.device_id.clone(), None));
            if rec.iot_edge
                && let Some(s) = &rec.device_scope
            {
                reg.scopes.insert(s.clone(), rec.device_id.clone());
            }
            reg.devices.insert(
                rec.device_id.clone(),
                DeviceEntry {
                    rec,
                    twin,
                    conn: ConnInfo::default(),
                    modules: BTreeMap::new(),
                },
            );
        }
        for kv in db.modules.iter() {
            let (_, v) = kv.into_inner()?;
            let rec: ModuleRecord = serde_json::from_slice(&v)
                .map_err(|e| CloudError::Storage(format!("module record: {e}")))?;
            let key = module_key(&rec.device_id, &rec.module_id);
            let twin = load_twin(&db, &key)?
                .unwrap_or_else(|| Twin::new(rec.device_id.clone(), Some(rec.module_id.clone())));
            // A module whose device is gone would be unreachable; deletes
            // remove both in one batch, so this only skips foreign data.
            if let Some(d) = reg.devices.get_mut(&rec.device_id) {
                d.modules.insert(
                    rec.module_id.clone(),
                    ModuleEntry {
                        rec,
                        twin,
                        conn: ConnInfo::default(),
                    },
                );
            }
        }
        let mut c2d = C2dQueues::default();
        for kv in db.c2d.iter() {
            let (k, v) = kv.into_inner()?;
            let Some(split) = k.len().checked_sub(9) else {
                continue;
            };
            let device = String::from_utf8_lossy(&k[..split]).into_owned();
            let mut seq_raw = [0u8; 8];
            seq_raw.copy_from_slice(&k[split + 1..]);
            let seq = u64::from_be_bytes(seq_raw);
            let q = Queued::decode(seq, &v)
                .ok_or_else(|| CloudError::Storage(format!("c2d entry {seq} of {device}")))?;
            c2d.next_seq = c2d.next_seq.max(seq + 1);
            c2d.queues.entry(device).or_default().push_back(q);
        }
        if let Some(kv) = db.feedback.last_key_value() {
            let k = kv.key()?;
            if let Ok(raw) = <[u8; 8]>::try_from(k.as_ref()) {
                c2d.next_feedback = u64::from_be_bytes(raw) + 1;
            }
        }
        for (dev, q) in &c2d.queues {
            if let Some(d) = reg.devices.get_mut(dev) {
                d.conn.c2d_count = q.len();
            }
        }
        let d2c = D2cLog::open(&db)?;
        let certs = crate::certs::CaStore::open(&db.db)?;
        let (desired_tx, _) = broadcast::channel(DESIRED_BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                data_dir: options.data_dir.clone(),
                hostname: options.hostname,
                db,
                writer: Mutex::new(()),
                reg: Mutex::new(reg),
                c2d: Mutex::new(c2d),
                conns: Mutex::new(Conns::default()),
                pending: Mutex::new(HashMap::new()),
                next_rid: AtomicU64::new(1),
                conn_changed: Notify::new(),
                desired_tx,
                d2c,
                certs,
                closed: AtomicBool::new(false),
                #[cfg(test)]
                commit_delay: Mutex::new(Duration::ZERO),
                #[cfg(test)]
                commit_held: AtomicBool::new(false),
            }),
        })
    }

    /// The hub host name (SAS audience host).
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }

    /// The data directory it was opened on.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.data_dir
    }

    /// Stops the D2C writer (after answering every queued append) and
    /// disconnects every connection. Later writes fail with `Closed`.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.d2c.close();
        lock(&self.inner.conns).map.clear();
        lock(&self.inner.pending).clear();
        if let Err(e) = self.inner.db.db.persist(fjall::PersistMode::SyncAll) {
            tracing::warn!(error = %e, "final persist failed");
        }
    }

    /// Test hook: slows every later registry or C2D commit by `d`.
    #[cfg(test)]
    pub(crate) fn set_commit_delay(&self, d: Duration) {
        *lock(&self.inner.commit_delay) = d;
    }

    /// Test hook: true while a commit is being slowed.
    #[cfg(test)]
    pub(crate) fn commit_held(&self) -> bool {
        self.inner.commit_held.load(Ordering::Acquire)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CloudError::Closed);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| CloudError::Storage(format!("blocking task failed: {e}")))?
    }
}

fn load_twin(db: &Db, key: &[u8]) -> Result<Option<Twin>> {
    match db.twins.get(key)? {
        None => Ok(None),
        Some(v) => {
            let s: StoredTwin = serde_json::from_slice(&v)
                .map_err(|e| CloudError::Storage(format!("twin record: {e}")))?;
            Ok(Some(s.into()))
        }
    }
}

fn twin_info(reg: &Registry, client: &ClientId) -> Result<TwinInfo> {
    let dev = client.device.as_str();
    let d = reg.devices.get(dev).ok_or_else(|| not_found_device(dev))?;
    let (twin, conn) = match &client.module {
        None => (d.twin.clone(), d.conn.clone()),
        Some(m) => {
            let me = d
                .modules
                .get(m.as_str())
                .ok_or_else(|| not_found_module(dev, m.as_str()))?;
            (me.twin.clone(), me.conn.clone())
        }
    };
    Ok(TwinInfo {
        twin,
        device: d.rec.clone(),
        conn,
    })
}

/// The twin and connection record of a device or module.
struct EntryMut<'a> {
    twin: &'a mut Twin,
    conn: &'a mut ConnInfo,
}

fn entry_mut<'a>(reg: &'a mut Registry, client: &ClientId) -> Result<EntryMut<'a>> {
    let dev = client.device.as_str();
    let d = reg
        .devices
        .get_mut(dev)
        .ok_or_else(|| not_found_device(dev))?;
    match &client.module {
        None => Ok(EntryMut {
            twin: &mut d.twin,
            conn: &mut d.conn,
        }),
        Some(m) => {
            let m = d
                .modules
                .get_mut(m.as_str())
                .ok_or_else(|| not_found_module(dev, m.as_str()))?;
            Ok(EntryMut {
                twin: &mut m.twin,
                conn: &mut m.conn,
            })
        }
    }
}

impl Inner {
    /// Commits a durable batch (fdatasync). Runs on the blocking pool.
    fn commit(&self, batch: OwnedWriteBatch) -> Result<()> {
        self.before_commit();
        batch.commit()?;
        Ok(())
    }

    #[cfg(test)]
    fn before_commit(&self) {
        let d = *lock(&self.commit_delay);
        if !d.is_zero() {
            self.commit_held.store(true, Ordering::Release);
            std::thread::sleep(d);
            self.commit_held.store(false, Ordering::Release);
        }
    }

    #[cfg(not(test))]
    fn before_commit(&self) {}
}
