//! What the device endpoint receives for a connected identity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokio::sync::mpsc;
use verge_core::ClientId;

/// Events queued per connection; beyond this, desired patches and C2D
/// notifications are coalesced into [`ConnectionEvent::Resync`] and method
/// calls are refused with 429, so a slow client never grows memory.
pub const EVENT_CAPACITY: usize = 64;

/// A direct-method call to deliver to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodRequest {
    /// Request id; pass it back to [`crate::CloudState::method_response`].
    pub rid: u64,
    /// Method name.
    pub name: String,
    /// JSON payload.
    pub payload: Value,
}

/// The client's answer to a direct method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    /// The status the device chose.
    pub status: i32,
    /// Its JSON payload.
    pub payload: Value,
}

/// Something the endpoint must push to the connected client.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionEvent {
    /// Invoke a direct method.
    Method(MethodRequest),
    /// Desired properties changed: the patch with `$version` (a deployment's
    /// replacement arrives as the full desired document).
    DesiredPatch(Value),
    /// A C2D message is waiting: call [`crate::CloudState::c2d_next`].
    C2dAvailable,
    /// Events were dropped because the client was slow: re-read the twin
    /// (send the client its full desired properties) and poll C2D.
    Resync,
}

pub(crate) struct ConnEntry {
    pub id: u64,
    pub tx: mpsc::Sender<ConnectionEvent>,
    pub lagged: Arc<AtomicBool>,
}

impl ConnEntry {
    /// Queues a notification, coalescing into `Resync` when full.
    pub fn notify(&self, ev: ConnectionEvent) {
        if self.tx.try_send(ev).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// Unregisters a connection (identity, connection id).
pub(crate) type OnDrop = Box<dyn FnOnce(&ClientId, u64) + Send + Sync>;

/// A registered connection. Dropping it marks the identity disconnected
/// (unless a newer connection of the same identity replaced it) and returns
/// its locked C2D messages to the queue.
pub struct Connection {
    pub(crate) client: ClientId,
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<ConnectionEvent>,
    pub(crate) lagged: Arc<AtomicBool>,
    pub(crate) on_drop: Option<OnDrop>,
}

impl Connection {
    /// The identity.
    pub fn client(&self) -> &ClientId {
        &self.client
    }

    /// The next event; `None` when the identity connected again elsewhere
    /// (the endpoint should then close this client, as IoT Hub does) or the
    /// cloud shut down.
    pub async fn recv(&mut self) -> Option<ConnectionEvent> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(ConnectionEvent::Resync);
        }
        self.rx.recv().await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f(&self.client, self.id);
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client", &self.client)
            .field("id", &self.id)
            .finish()
    }
}
