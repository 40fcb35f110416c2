//! Persistent MQTT sessions: subscriptions per client id (kept across
//! reconnects and hub restarts for clean_session=0) and the live connection
//! currently attached to each session.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
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

/// The protocol a client connected with, as IoT Hub's SDKs name their
/// transports (a backend may show it; nothing routes by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TLS (8883).
    Mqtt,
    /// MQTT over WebSocket (443).
    MqttWs,
    /// AMQP over TLS (5671).
    Amqp,
    /// AMQP over WebSocket (443).
    AmqpWs,
}

impl Transport {
    /// `MQTT`, `MQTT_WS`, `AMQP`, `AMQP_WS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "MQTT",
            Transport::MqttWs => "MQTT_WS",
            Transport::Amqp => "AMQP",
            Transport::AmqpWs => "AMQP_WS",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A live connection attached to a session.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Unique per connection.
    pub id: u64,
    /// The protocol it speaks.
    pub transport: Transport,
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
///
/// Persistent sessions (clean_session=0) are kept on disk one small file per
/// session (`<dir>/<sha256 of the client id>.json`, holding the id and its
/// subscriptions), written atomically and fsync'd by a persister task when
/// that session changes: a change costs one small write, whatever the number
/// of sessions. A sessions file of the older layout (`<dir>.json`, every
/// session in one document) is split into the directory at open.
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
    changed: watch::Sender<u64>,
    /// Client ids whose file is out of date.
    dirty: Mutex<HashSet<String>>,
    persist: Arc<Notify>,
    /// One persister at a time writes files (flush and the task).
    writing: tokio::sync::Mutex<()>,
    dir: PathBuf,
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One session's file.
#[derive(Serialize, Deserialize)]
struct SavedSession {
    id: String,
    subs: BTreeSet<String>,
}

/// The file name of `client_id`'s session: a hash, since client ids may hold
/// `/` and be longer than a file name may be.
fn session_file(dir: &Path, client_id: &str) -> PathBuf {
    dir.join(verge_files::keyed_file_name(client_id, "json"))
}

/// Reads every session file of `dir` and migrates `<dir>.json` (blocking).
/// Damaged files are moved aside (see `verge_files::load_json`).
#[expect(
    clippy::disallowed_methods,
    reason = "runs in spawn_blocking (Sessions::open)"
)]
fn load_dir(dir: &Path) -> std::io::Result<HashMap<String, Session>> {
    verge_files::create_private_dir(dir)?;
    let mut map = HashMap::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        if let Some(s) = verge_files::load_json::<SavedSession>(&path)? {
            map.insert(
                s.id,
                Session {
                    subs: s.subs,
                    persistent: true,
                    conn: None,
                },
            );
        }
    }
    let legacy = dir.with_extension("json");
    if let Some(saved) = verge_files::load_json::<BTreeMap<String, BTreeSet<String>>>(&legacy)? {
        for (id, subs) in saved {
            let bytes = serde_json::to_vec(&SavedSession {
                id: id.clone(),
                subs: subs.clone(),
            })
            .map_err(std::io::Error::other)?;
            verge_files::write_atomic(&session_file(dir, &id), &bytes)?;
            map.insert(
                id,
                Session {
                    subs,
                    persistent: true,
                    conn: None,
                },
            );
        }
        verge_files::remove_durable(&legacy)?;
        tracing::info!(file = %legacy.display(), dir = %dir.display(), "sessions moved to one file each");
    }
    Ok(map)
}

impl Sessions {
    /// Loads the persisted sessions of `dir` (created 0700 if missing) and
    /// starts the persister as a task of `shutdown`; it writes what is left
    /// and ends when the shutdown begins.
    pub async fn open(
        dir: PathBuf,
        shutdown: &verge_shutdown::Shutdown,
    ) -> anyhow::Result<Arc<Self>> {
        let d = dir.clone();
        let map = tokio::task::spawn_blocking(move || load_dir(&d)).await??;
        let (changed, _) = watch::channel(0);
        let this = Arc::new(Self {
            inner: Mutex::new(map),
            changed,
            dirty: Mutex::new(HashSet::new()),
            persist: Arc::new(Notify::new()),
            writing: tokio::sync::Mutex::new(()),
            dir,
            next_conn: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&this);
        let persist = this.persist.clone();
        let token = shutdown.token();
        shutdown.spawn("sessions persister", async move {
            loop {
                let stop = tokio::select! {
                    () = persist.notified() => false,
                    () = token.cancelled() => true,
                };
                let Some(this) = weak.upgrade() else { break };
                if let Err(e) = this.flush().await {
                    tracing::error!(error = %e, "cannot persist sessions");
                }
                if stop {
                    break;
                }
            }
        });
        Ok(this)
    }

    /// A new connection id, unique within these sessions.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes the sessions changed since the last write to disk now.
    pub async fn flush(&self) -> std::io::Result<()> {
        let _writing = self.writing.lock().await;
        let dirty: Vec<String> = lock(&self.dirty).drain().collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let work: Vec<(PathBuf, Option<Vec<u8>>)> = {
            let map = lock(&self.inner);
            dirty
                .iter()
                .map(|id| {
                    let file = session_file(&self.dir, id);
                    let bytes = map.get(id).filter(|s| s.persistent).map(|s| {
                        serde_json::to_vec(&SavedSession {
                            id: id.clone(),
                            subs: s.subs.clone(),
                        })
                        .unwrap_or_default()
                    });
                    (file, bytes)
                })
                .collect()
        };
        let done = tokio::task::spawn_blocking(move || {
            for (file, bytes) in work {
                match bytes {
                    Some(b) => verge_files::write_atomic(&file, &b)?,
                    None => verge_files::remove_durable(&file)?,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other)?;
        if done.is_err() {
            // Written again next time (a later write of the same session
            // holds the newest state anyway).
            lock(&self.dirty).extend(dirty);
        }
        done
    }

    /// Marks `client_id`'s file out of date and wakes the persister.
    fn mark(&self, client_id: &str) {
        lock(&self.dirty).insert(client_id.to_owned());
        self.persist.notify_one();
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
        let changed;
        {
            let mut map = lock(&self.inner);
            let s = map.entry(client_id.to_owned()).or_default();
            if let Some(old) = s.conn.take() {
                tracing::info!(client = client_id, "session taken over by a new connection");
                old.kick.notify_one();
            }
            // Only a change of what is persisted touches the disk.
            let before = (s.persistent, s.subs.is_empty());
            if clean {
                s.subs.clear();
                present = false;
            } else {
                present = s.persistent;
            }
            s.persistent = !clean;
            s.conn = Some(conn);
            changed = before != (s.persistent, s.subs.is_empty());
        }
        if changed {
            self.mark(client_id);
        }
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
        self.mark(client_id);
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
        self.mark(client_id);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]
    use super::*;
    use std::time::Duration;

    fn handle(s: &Sessions) -> ConnHandle {
        let (tx, _rx) = mpsc::channel(1);
        ConnHandle {
            id: s.next_conn_id(),
            transport: Transport::Mqtt,
            tx,
            kick: Arc::new(Notify::new()),
        }
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// A change to one session rewrites that session's file only; reopening
    /// restores every persistent session; a clean session leaves no file.
    #[tokio::test]
    async fn one_change_writes_one_small_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sessions");
        let shutdown = verge_shutdown::Shutdown::new();
        let s = Sessions::open(dir.clone(), &shutdown).await.unwrap();
        for id in ["a/m", "b", "c"] {
            s.attach(id, false, handle(&s));
            s.subscribe(id, &[format!("devices/{id}/#")]);
        }
        s.attach("clean", true, handle(&s));
        s.flush().await.unwrap();
        assert_eq!(files(&dir).len(), 3);
        // Mark b's file: a change to a/m must leave it alone.
        let b_file = session_file(&dir, "b");
        std::fs::write(&b_file, br#"{"id":"b","subs":["sentinel"]}"#).unwrap();
        s.subscribe("a/m", &["$iothub/methods/POST/#".to_owned()]);
        s.unsubscribe("c", &["devices/c/#".to_owned()]);
        s.flush().await.unwrap();
        assert_eq!(
            std::fs::read(&b_file).unwrap(),
            br#"{"id":"b","subs":["sentinel"]}"#
        );
        // Reconnecting with nothing changed writes nothing either.
        s.attach("b", false, handle(&s));
        s.flush().await.unwrap();
        assert!(
            std::fs::read_to_string(&b_file)
                .unwrap()
                .contains("sentinel")
        );
        // A clean reconnect forgets the session on disk too.
        s.attach("c", true, handle(&s));
        s.flush().await.unwrap();
        assert_eq!(files(&dir).len(), 2);
        shutdown.finish(Duration::from_secs(5)).await;
        drop(s);

        let s = Sessions::open(dir.clone(), &verge_shutdown::Shutdown::new())
            .await
            .unwrap();
        let mut a = s.subscriptions("a/m");
        a.sort();
        assert_eq!(a, ["$iothub/methods/POST/#", "devices/a/m/#"]);
        assert_eq!(s.subscriptions("b"), ["sentinel"]);
        assert!(s.subscriptions("c").is_empty());
    }

    /// The older single-file layout is split into one file per session, and
    /// a damaged session file is moved aside without losing the others.
    #[tokio::test]
    async fn migrates_the_single_file_and_survives_a_damaged_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sessions");
        std::fs::write(
            tmp.path().join("sessions.json"),
            br#"{"d1": ["x/#"], "d2/m": ["y/#"]}"#,
        )
        .unwrap();
        let s = Sessions::open(dir.clone(), &verge_shutdown::Shutdown::new())
            .await
            .unwrap();
        assert_eq!(s.subscriptions("d1"), ["x/#"]);
        assert_eq!(s.subscriptions("d2/m"), ["y/#"]);
        assert!(!tmp.path().join("sessions.json").exists());
        assert_eq!(files(&dir).len(), 2);
        drop(s);

        std::fs::write(session_file(&dir, "d1"), b"").unwrap();
        let s = Sessions::open(dir.clone(), &verge_shutdown::Shutdown::new())
            .await
            .unwrap();
        assert!(s.subscriptions("d1").is_empty());
        assert_eq!(s.subscriptions("d2/m"), ["y/#"]);
        assert!(
            files(&dir)
                .iter()
                .any(|p| p.to_string_lossy().contains(".json.damaged-"))
        );
    }

    /// The persister writes what is pending when the shutdown begins.
    #[tokio::test]
    async fn the_persister_flushes_at_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sessions");
        let shutdown = verge_shutdown::Shutdown::new();
        let s = Sessions::open(dir.clone(), &shutdown).await.unwrap();
        s.attach("d", false, handle(&s));
        s.subscribe("d", &["t/#".to_owned()]);
        assert!(shutdown.finish(Duration::from_secs(5)).await.is_empty());
        let text = std::fs::read_to_string(session_file(&dir, "d")).unwrap();
        assert!(text.contains("t/#"), "{text}");
    }
}
