//! Persistent MQTT sessions: subscriptions per client id (kept across
//! reconnects and hub restarts for clean_session=0) and the live connection
//! currently attached to each session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::topic::filter_matches;

/// Most subscriptions one session holds. IoT Hub's topic set per identity
/// is small — C2D, twin responses, desired patches, methods, module inputs,
/// each one filter (`…/#`) as the SDKs subscribe, or a handful of narrower
/// ones — so 64 leaves ample room while bounding what a client can make the
/// endpoint keep (in memory, in the persisted sessions, and scanned on every
/// delivery).
pub const MAX_SUBSCRIPTIONS: usize = 64;

/// Something to publish to a connected client.
#[derive(Debug)]
pub struct Outbound {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Completed when the client PUBACKs (QoS 1). Dropped if the connection goes away.
    pub ack: Option<oneshot::Sender<()>>,
}

/// A live connection attached to a session.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Unique per connection.
    pub id: u64,
    /// Bounded queue into the connection's writer.
    pub tx: mpsc::Sender<Outbound>,
    /// Notified to make the connection close (takeover).
    pub kick: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Session {
    subs: BTreeSet<String>,
    persistent: bool,
    conn: Option<ConnHandle>,
}

/// All sessions.
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
    changed: watch::Sender<u64>,
    persist: Arc<Notify>,
    path: PathBuf,
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    /// Loads persisted sessions from `path` (a JSON file) and starts the persister task.
    pub async fn open(path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let mut map = HashMap::new();
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let saved: BTreeMap<String, BTreeSet<String>> = serde_json::from_slice(&bytes)?;
                for (id, subs) in saved {
                    map.insert(
                        id,
                        Session {
                            subs,
                            persistent: true,
                            conn: None,
                        },
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let (changed, _) = watch::channel(0);
        let this = Arc::new(Self {
            inner: Mutex::new(map),
            changed,
            persist: Arc::new(Notify::new()),
            path,
            next_conn: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&this);
        let persist = this.persist.clone();
        tokio::spawn(async move {
            loop {
                persist.notified().await;
                let Some(this) = weak.upgrade() else { break };
                let snapshot = this.snapshot();
                let path = this.path.clone();
                drop(this);
                if let Err(e) = write_atomic(&path, &snapshot).await {
                    tracing::error!(path = %path.display(), error = %e, "cannot persist sessions");
                }
            }
        });
        Ok(this)
    }

    /// A new connection id, unique within these sessions.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes the sessions to disk now.
    pub async fn flush(&self) -> std::io::Result<()> {
        let snapshot = self.snapshot();
        write_atomic(&self.path, &snapshot).await
    }

    fn snapshot(&self) -> Vec<u8> {
        let map = lock(&self.inner);
        let saved: BTreeMap<&String, &BTreeSet<String>> = map
            .iter()
            .filter(|(_, s)| s.persistent)
            .map(|(k, s)| (k, &s.subs))
            .collect();
        serde_json::to_vec_pretty(&saved).unwrap_or_default()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that changes whenever a connection attaches/detaches or subscriptions change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Attaches a new connection to `client_id`'s session, kicking any previous
    /// connection. Returns whether a session was present.
    pub fn attach(&self, client_id: &str, clean: bool, conn: ConnHandle) -> bool {
        let present;
        {
            let mut map = lock(&self.inner);
            let s = map.entry(client_id.to_owned()).or_default();
            if let Some(old) = s.conn.take() {
                tracing::info!(client = client_id, "session taken over by a new connection");
                old.kick.notify_one();
            }
            if clean {
                s.subs.clear();
                present = false;
            } else {
                present = s.persistent;
            }
            s.persistent = !clean;
            s.conn = Some(conn);
        }
        self.persist.notify_one();
        self.bump();
        present
    }

    /// Detaches connection `conn_id` (if it is still the session's connection).
    pub fn detach(&self, client_id: &str, conn_id: u64) {
        let mut changed = false;
        {
            let mut map = lock(&self.inner);
            if let Some(s) = map.get_mut(client_id)
                && s.conn.as_ref().is_some_and(|c| c.id == conn_id)
            {
                s.conn = None;
                changed = true;
                if !s.persistent {
                    map.remove(client_id);
                }
            }
        }
        if changed {
            self.bump();
        }
    }

    /// Adds subscriptions, up to [`MAX_SUBSCRIPTIONS`] per session. Returns,
    /// per filter, whether it is granted (a filter the session already holds
    /// always is; one beyond the cap is not, and the caller answers 0x80).
    pub fn subscribe(&self, client_id: &str, filters: &[String]) -> Vec<bool> {
        let granted = {
            let mut map = lock(&self.inner);
            let s = map.entry(client_id.to_owned()).or_default();
            filters
                .iter()
                .map(|f| {
                    if s.subs.contains(f) {
                        return true;
                    }
                    if s.subs.len() >= MAX_SUBSCRIPTIONS {
                        return false;
                    }
                    s.subs.insert(f.clone())
                })
                .collect()
        };
        self.persist.notify_one();
        self.bump();
        granted
    }

    /// Removes subscriptions.
    pub fn unsubscribe(&self, client_id: &str, filters: &[String]) {
        {
            let mut map = lock(&self.inner);
            if let Some(s) = map.get_mut(client_id) {
                for f in filters {
                    s.subs.remove(f);
                }
            }
        }
        self.persist.notify_one();
        self.bump();
    }

    /// The live connection of `client_id`, if it is connected and has a
    /// subscription matching `topic`.
    pub fn deliverable(&self, client_id: &str, topic: &str) -> Option<ConnHandle> {
        let map = lock(&self.inner);
        let s = map.get(client_id)?;
        let conn = s.conn.as_ref()?;
        s.subs
            .iter()
            .any(|f| filter_matches(f, topic))
            .then(|| conn.clone())
    }

    /// True when `client_id` has a live connection.
    pub fn is_connected(&self, client_id: &str) -> bool {
        lock(&self.inner)
            .get(client_id)
            .is_some_and(|s| s.conn.is_some())
    }

    /// The subscriptions of `client_id`.
    pub fn subscriptions(&self, client_id: &str) -> Vec<String> {
        lock(&self.inner)
            .get(client_id)
            .map(|s| s.subs.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Writes `bytes` to `path` via a temporary file and a rename.
pub async fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}
