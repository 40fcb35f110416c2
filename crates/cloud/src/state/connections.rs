//! Live connections of device endpoint clients (connect, disconnect, events
//! pushed to them) and direct methods, which travel over those connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use verge_core::ClientId;
use verge_core::method::{MAX_METHOD_PAYLOAD, check_method_name};

use super::{CloudState, Inner, Pending, entry_mut, lock, now, twin_info};
use crate::conn::{
    ConnEntry, Connection, ConnectionEvent, EVENT_CAPACITY, MethodRequest, MethodResponse,
};
use crate::error::{CloudError, Result};
use verge_endpoint::session::Transport;

impl CloudState {
    /// Registers a connected client (after authentication). A newer
    /// connection of the same identity replaces the older, whose
    /// [`Connection::recv`] then returns `None`. `transport` is shown in
    /// the identity's JSON (`connectionProtocol`) until its next connection.
    pub fn connect(&self, client: &ClientId, transport: Transport) -> Result<Connection> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CloudError::Closed);
        }
        let t = now().as_millis();
        {
            let mut reg = lock(&self.inner.reg);
            let conn = entry_mut(&mut reg, client).map(|e| e.conn)?;
            conn.connected = true;
            conn.transport = Some(transport);
            conn.updated_ms = t;
            conn.activity_ms = t;
        }
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = {
            let mut conns = lock(&self.inner.conns);
            conns.next_id += 1;
            let id = conns.next_id;
            conns.map.insert(
                client.clone(),
                ConnEntry {
                    id,
                    tx,
                    lagged: lagged.clone(),
                },
            );
            id
        };
        self.inner.conn_changed.notify_waiters();
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Ok(Connection {
            client: client.clone(),
            id,
            rx,
            lagged,
            on_drop: Some(Box::new(move |client, id| {
                if let Some(inner) = weak.upgrade() {
                    inner.disconnect(client, id);
                }
            })),
        })
    }

    /// True while a connection of `client` is registered.
    pub fn is_connected(&self, client: &ClientId) -> bool {
        lock(&self.inner.conns).map.contains_key(client)
    }

    // ---------------------------------------------------------------- methods

    /// Invokes a direct method and waits for the answer. 400 when the name
    /// is not one IoT Hub accepts and 413 when the serialized payload is over
    /// 128 KB (both before anything is sent: a `#` or `+` in the request
    /// topic would make the endpoint drop the target's connection); 404 when
    /// the target is unknown or (after waiting up to `connect_timeout` for it
    /// to connect) not connected; 504 when it does not answer within
    /// `response_timeout`; 429 when its event queue is full.
    pub async fn invoke_method(
        &self,
        target: &ClientId,
        name: &str,
        payload: Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<MethodResponse> {
        check_method_name(name).map_err(|e| CloudError::BadRequest(e.to_string()))?;
        let size = serde_json::to_vec(&payload).map_or(0, |v| v.len());
        if size > MAX_METHOD_PAYLOAD {
            return Err(CloudError::TooLarge(format!(
                "method payload is {size} bytes; the limit is {MAX_METHOD_PAYLOAD}"
            )));
        }
        {
            let reg = lock(&self.inner.reg);
            twin_info(&reg, target)?;
        }
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let rid = self.inner.next_rid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // The answer slot exists before the request is visible: on a
        // multi-threaded runtime the endpoint may answer at once.
        lock(&self.inner.pending).insert(
            rid,
            Pending {
                target: target.clone(),
                tx,
            },
        );
        let unregister = || lock(&self.inner.pending).remove(&rid);
        loop {
            // Register interest before checking, so a connect in between is not missed.
            let changed = self.inner.conn_changed.notified();
            let sent = {
                let conns = lock(&self.inner.conns);
                conns.map.get(target).map(|c| {
                    c.tx.try_send(ConnectionEvent::Method(MethodRequest {
                        rid,
                        name: name.to_owned(),
                        payload: payload.clone(),
                    }))
                })
            };
            match sent {
                Some(Ok(())) => break,
                Some(Err(_)) => {
                    unregister();
                    return Err(CloudError::Throttled(format!(
                        "{target} has too many pending requests"
                    )));
                }
                None => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        unregister();
                        return Err(CloudError::NotOnline(format!("{target} is not connected")));
                    }
                }
            }
        }
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(CloudError::Timeout(format!(
                "{target} disconnected before answering method {name:?}"
            ))),
            Err(_) => {
                unregister();
                Err(CloudError::Timeout(format!(
                    "{target} did not answer method {name:?} within {response_timeout:?}"
                )))
            }
        }
    }

    /// Routes a client's method answer to the waiting caller. False when no
    /// call with that id is pending for this client (late or foreign answer).
    pub fn method_response(&self, from: &ClientId, rid: u64, response: MethodResponse) -> bool {
        let mut pending = lock(&self.inner.pending);
        match pending.get(&rid) {
            Some(p) if &p.target == from => {}
            _ => return false,
        }
        pending
            .remove(&rid)
            .is_some_and(|p| p.tx.send(response).is_ok())
    }
}

impl Inner {
    pub(super) fn notify(&self, client: &ClientId, ev: ConnectionEvent) {
        if let Some(c) = lock(&self.conns).map.get(client) {
            c.notify(ev);
        }
    }

    fn disconnect(&self, client: &ClientId, id: u64) {
        let removed = {
            let mut conns = lock(&self.conns);
            match conns.map.get(client) {
                Some(c) if c.id == id => conns.map.remove(client).is_some(),
                _ => false,
            }
        };
        if !removed {
            return;
        }
        {
            let mut reg = lock(&self.reg);
            if let Ok(c) = entry_mut(&mut reg, client).map(|e| e.conn) {
                c.connected = false;
                c.updated_ms = now().as_millis();
            }
        }
        if client.module.is_none() {
            // Whatever it had locked goes back to the queue, in memory only:
            // locks are never persisted.
            let mut c2d = lock(&self.c2d);
            if let Some(q) = c2d.queues.get_mut(client.device.as_str()) {
                for m in q.iter_mut() {
                    m.lock = None;
                }
            }
        }
        self.conn_changed.notify_waiters();
    }

    pub(super) fn kick(&self, device: &str) {
        lock(&self.conns)
            .map
            .retain(|c, _| c.device.as_str() != device);
    }
}
