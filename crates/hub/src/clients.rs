//! The `clients` section of the `$edgeHub` twin's reported properties:
//! every client that has connected to this hub, with `status`
//! (`Connected`/`Disconnected`), `lastConnectedTimeUtc` and
//! `lastDisconnectedTimeUtc`, as edgeHub reports it (reference §2.3).
//!
//! Connections only mark clients changed; one task writes the changes as one
//! reported patch at most once per [`REPORT_DELAY`], so a connection storm
//! (every module reconnecting after a restart) is one patch, not hundreds.
//! While the cloud is unreachable the patches queue with the twin's other
//! reported patches; the reporter leaves at least half of that bounded
//! queue to them (a new `lastDesiredStatus` must always fit) and keeps the
//! latest state meanwhile, so a long outage costs one patch, not one per
//! reconnect.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use verge_core::time::Timestamp;

use crate::twins::MAX_PENDING_REPORTED;
use crate::{HubState, lock};

/// Changes gathered into one reported patch.
pub const REPORT_DELAY: Duration = Duration::from_secs(1);
/// How long to wait before trying again when the twin's queue of patches for
/// the cloud is at the reporter's share.
const QUEUE_RETRY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Client {
    /// Connections open now: with a session take-over the new one arrives
    /// before the old one leaves, and the client stays connected throughout.
    live: u32,
    last_connected: Option<Timestamp>,
    last_disconnected: Option<Timestamp>,
    /// Changed since the last report.
    dirty: bool,
}

impl Client {
    /// Times not known yet are left out (a null would delete them).
    fn status(&self) -> Value {
        let mut m = Map::new();
        let status = if self.live > 0 {
            "Connected"
        } else {
            "Disconnected"
        };
        m.insert("status".into(), json!(status));
        if let Some(t) = self.last_connected {
            m.insert("lastConnectedTimeUtc".into(), json!(t.to_iso8601()));
        }
        if let Some(t) = self.last_disconnected {
            m.insert("lastDisconnectedTimeUtc".into(), json!(t.to_iso8601()));
        }
        Value::Object(m)
    }
}

/// Connection status of the hub's clients, waiting to be reported.
#[derive(Default)]
pub struct ClientStatus {
    clients: Mutex<HashMap<String, Client>>,
    changed: Notify,
}

impl ClientStatus {
    /// `id` opened a connection.
    pub fn connected(&self, id: &str) {
        let mut clients = lock(&self.clients);
        let c = clients.entry(id.to_owned()).or_default();
        c.live += 1;
        c.last_connected = Some(Timestamp::now());
        c.dirty = true;
        drop(clients);
        self.changed.notify_one();
    }

    /// A connection of `id` ended.
    pub fn disconnected(&self, id: &str) {
        let mut clients = lock(&self.clients);
        let c = clients.entry(id.to_owned()).or_default();
        c.live = c.live.saturating_sub(1);
        if c.live == 0 {
            c.last_disconnected = Some(Timestamp::now());
            c.dirty = true;
        }
        drop(clients);
        self.changed.notify_one();
    }

    /// Clients with at least one connection open now.
    pub fn connected_count(&self) -> usize {
        lock(&self.clients).values().filter(|c| c.live > 0).count()
    }

    /// Takes the changed clients as a `clients` patch (`None` if none).
    fn take_patch(&self) -> Option<Value> {
        let mut clients = lock(&self.clients);
        let mut patch = Map::new();
        for (id, c) in clients.iter_mut().filter(|(_, c)| c.dirty) {
            c.dirty = false;
            patch.insert(id.clone(), c.status());
        }
        (!patch.is_empty()).then(|| json!({ "clients": patch }))
    }

    /// Marks `ids` changed again (their patch was not written).
    fn retry(&self, ids: impl IntoIterator<Item = String>) {
        let mut clients = lock(&self.clients);
        for id in ids {
            if let Some(c) = clients.get_mut(&id) {
                c.dirty = true;
            }
        }
    }

    /// Clients the twin last showed as connected that have no connection
    /// now (the hub restarted under them): reported disconnected at `now`.
    fn restarted(&self, reported: Option<&Value>, now: Timestamp) {
        let Some(Value::Object(previous)) = reported else {
            return;
        };
        let mut clients = lock(&self.clients);
        for (id, v) in previous {
            if v.get("status").and_then(Value::as_str) != Some("Connected") {
                continue;
            }
            let c = clients.entry(id.clone()).or_default();
            if c.live == 0 && !c.dirty {
                c.last_connected = v
                    .get("lastConnectedTimeUtc")
                    .and_then(Value::as_str)
                    .and_then(|s| Timestamp::parse(s).ok());
                c.last_disconnected = Some(now);
                c.dirty = true;
            }
        }
    }
}

/// Writes connection changes to the `$edgeHub` twin's reported properties
/// (and so, with an upstream, to the cloud), forever.
pub async fn run(state: &HubState) {
    let id = state.edgehub_twin_id();
    let twin = state.twins.client_json(&id);
    state
        .clients
        .restarted(twin.pointer("/reported/clients"), Timestamp::now());
    loop {
        tokio::time::sleep(REPORT_DELAY).await;
        if state.twins.pending_reported(&id) >= MAX_PENDING_REPORTED / 2 {
            // The latest state waits here, merged, instead of in the queue.
            tokio::time::sleep(QUEUE_RETRY).await;
            continue;
        }
        let Some(patch) = state.clients.take_patch() else {
            state.clients.changed.notified().await;
            continue;
        };
        if let Err(e) = state.twins.patch_reported(&id, &patch).await {
            tracing::warn!(error = %e, "cannot report client connection status on the $edgeHub twin");
            let ids = patch["clients"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            state.clients.retry(ids);
            tokio::time::sleep(QUEUE_RETRY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn take_over_keeps_a_client_connected() {
        let s = ClientStatus::default();
        s.connected("d/m");
        let p = s.take_patch().unwrap();
        assert_eq!(p["clients"]["d/m"]["status"], "Connected");
        assert!(p["clients"]["d/m"]["lastDisconnectedTimeUtc"].is_null());
        assert!(s.take_patch().is_none(), "nothing changed since");

        // New connection first, then the old one leaves: still connected,
        // and the old one's end is no change worth reporting.
        s.connected("d/m");
        let _ = s.take_patch();
        s.disconnected("d/m");
        assert!(s.take_patch().is_none());

        s.disconnected("d/m");
        let p = s.take_patch().unwrap();
        assert_eq!(p["clients"]["d/m"]["status"], "Disconnected");
        assert!(p["clients"]["d/m"]["lastDisconnectedTimeUtc"].is_string());
        assert!(p["clients"]["d/m"]["lastConnectedTimeUtc"].is_string());
    }

    #[test]
    fn changes_are_merged_and_retried() {
        let s = ClientStatus::default();
        s.connected("a");
        s.connected("b");
        s.disconnected("a");
        s.connected("a");
        let p = s.take_patch().unwrap();
        let m = p["clients"].as_object().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["a"]["status"], "Connected");
        s.retry(["b".to_owned(), "unknown".to_owned()]);
        let p = s.take_patch().unwrap();
        assert_eq!(p["clients"].as_object().unwrap().len(), 1);
        assert_eq!(p["clients"]["b"]["status"], "Connected");
    }

    #[test]
    fn a_restart_disconnects_who_was_connected() {
        let s = ClientStatus::default();
        s.connected("back");
        let _ = s.take_patch();
        let before = json!({
            "gone": {"status": "Connected", "lastConnectedTimeUtc": "2026-01-02T03:04:05.000Z", "lastDisconnectedTimeUtc": null},
            "back": {"status": "Connected", "lastConnectedTimeUtc": "2026-01-02T03:04:05.000Z", "lastDisconnectedTimeUtc": null},
            "idle": {"status": "Disconnected", "lastConnectedTimeUtc": null, "lastDisconnectedTimeUtc": null},
        });
        let now = Timestamp::parse("2026-02-01T00:00:00.000Z").unwrap();
        s.restarted(Some(&before), now);
        let p = s.take_patch().unwrap();
        let m = p["clients"].as_object().unwrap();
        assert_eq!(m.len(), 1, "{p}");
        assert_eq!(m["gone"]["status"], "Disconnected");
        assert_eq!(
            m["gone"]["lastConnectedTimeUtc"],
            "2026-01-02T03:04:05.000Z"
        );
        assert_eq!(
            m["gone"]["lastDisconnectedTimeUtc"],
            "2026-02-01T00:00:00.000Z"
        );
    }
}
