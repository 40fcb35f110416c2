//! What a link does with the cloud's traffic for its identity: the twin
//! (GET answers, desired patches, reported-patch answers), direct method
//! calls relayed to the local client, C2D messages relayed to a
//! downstream device (completed upstream only on its PUBACK).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use serde_json::Value;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::link::{C2dTag, LinkIo, Next, Op, write_packet};
use super::{C2D_ACK_TIMEOUT, MAX_RELAYS, METHOD_TIMEOUT, REPORTED_RETRY};
use crate::session::Outbound;
use crate::twins::CloudPatch;
use crate::{methods, topic};

/// Sends a twin GET with request id `rid`.
pub(super) async fn twin_get<W: AsyncWrite + Unpin>(wr: &mut W, rid: &str) -> Result<(), String> {
    let p = Publish::new(
        format!("$iothub/twin/GET/?$rid={rid}"),
        QoS::AtMostOnce,
        Vec::new(),
    );
    write_packet(wr, &Packet::Publish(p)).await
}

/// `(status, rid)` of a `$iothub/twin/res/{status}/?$rid={rid}` topic.
pub(super) fn twin_response(topic: &[u8]) -> Option<(u16, String)> {
    let rest = std::str::from_utf8(topic)
        .ok()?
        .strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once('/')?;
    let query = query.strip_prefix('?').unwrap_or(query);
    Some((status.parse().ok()?, topic::query_param(query, "$rid")?))
}

/// The answer to the twin GET (either transport): the cloud's twin replaces the cached one,
/// and the client gets the desired changes it missed as one patch.
async fn on_twin(io: &LinkIo, status: u16, payload: &[u8]) {
    if status != 200 {
        tracing::warn!(identity = %io.name, status, "the cloud refused the twin GET; keeping the cached twin");
        return;
    }
    let body: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(identity = %io.name, error = %e, "the cloud's twin is not JSON");
            return;
        }
    };
    if let Some((msg, version)) = io.state.twins.cloud_twin(&io.name, &body).await {
        tracing::info!(identity = %io.name, version, "desired properties changed while away; pushing the difference");
        desired_changed(io, &msg, version).await;
    }
}

/// A twin request in flight on a session, by its request id.
pub(super) enum TwinReq {
    /// The desired-notifications subscription (AMQP's PUT).
    Subscribe,
    /// Full GET: the cloud's twin replaces the cached one.
    Sync,
    /// Reported patch `seq` of the identity's queue.
    Reported(u64),
}

/// A session's twin traffic, whatever carries it: requests in flight,
/// whether the GET came back, the one reported patch in flight and when a
/// deferred one goes again.
pub(super) struct TwinState {
    reqs: HashMap<String, (TwinReq, Instant)>,
    synced: bool,
    reported_inflight: bool,
    reported_retry: Option<Instant>,
    /// How long the cloud has to answer.
    timeout: Duration,
}

impl TwinState {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            reqs: HashMap::new(),
            synced: false,
            reported_inflight: false,
            reported_retry: None,
            timeout,
        }
    }

    /// Request `rid` of `kind` went out.
    pub(super) fn sent(&mut self, rid: String, kind: TwinReq) {
        if matches!(kind, TwinReq::Reported(_)) {
            self.reported_inflight = true;
        }
        self.reqs.insert(rid, (kind, Instant::now()));
    }

    /// The request `rid` answers, if it is ours.
    pub(super) fn take(&mut self, rid: &str) -> Option<TwinReq> {
        self.reqs.remove(rid).map(|(k, _)| k)
    }

    /// A GET is in flight.
    pub(super) fn syncing(&self) -> bool {
        self.reqs.values().any(|(k, _)| matches!(k, TwinReq::Sync))
    }

    /// Nothing in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// The next queued reported patch to send, once the GET came back and
    /// nothing else of the twin is in flight or deferred.
    pub(super) fn next_reported(&mut self, io: &LinkIo) -> Option<crate::twins::PendingReported> {
        if self.reported_retry.is_some_and(|at| Instant::now() >= at) {
            self.reported_retry = None;
        }
        if !self.synced || self.reported_inflight || self.reported_retry.is_some() {
            return None;
        }
        io.state.twins.next_reported(&io.name)
    }

    /// When an unanswered request times out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.reqs.values().map(|(_, at)| *at + self.timeout).min()
    }

    /// When a deferred reported patch may go again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.reported_retry
    }

    /// Gives up the requests past their time: an unanswered twin request
    /// does not cost the link (its telemetry keeps flowing): the GET is given
    /// up (the cached twin stays), a reported patch is sent again later.
    pub(super) fn expire(&mut self, name: &str) {
        let now = Instant::now();
        let timeout = self.timeout;
        let mut gave_up = Vec::new();
        self.reqs.retain(|_, (kind, at)| {
            if *at + timeout > now {
                return true;
            }
            gave_up.push(std::mem::replace(kind, TwinReq::Subscribe));
            false
        });
        for kind in gave_up {
            tracing::warn!(identity = %name, "no twin response from the cloud in time");
            match kind {
                TwinReq::Sync => self.synced = true,
                TwinReq::Reported(_) => {
                    self.reported_inflight = false;
                    self.reported_retry = Some(now + REPORTED_RETRY);
                }
                TwinReq::Subscribe => {}
            }
        }
    }

    /// The cloud answered `kind` with `status` and `body`.
    pub(super) async fn answered(&mut self, io: &LinkIo, kind: TwinReq, status: u16, body: &[u8]) {
        match kind {
            TwinReq::Sync => {
                on_twin(io, status, body).await;
                self.synced = true;
            }
            TwinReq::Reported(seq) => {
                self.reported_inflight = false;
                if on_reported(io, seq, status).await {
                    self.reported_retry = Some(Instant::now() + REPORTED_RETRY);
                }
            }
            TwinReq::Subscribe => {
                if !(200..300).contains(&status) {
                    tracing::warn!(identity = %io.name, status, "the cloud refused the desired-properties subscription");
                }
            }
        }
    }
}

/// A desired change from the cloud, already in the local twin: pushed to the
/// client — or, for the hub's own `$edgeHub` twin, applied as the hub's
/// configuration (routes), which validates it whole and reports the outcome.
async fn desired_changed(io: &LinkIo, msg: &Value, version: u64) {
    if io.name != io.state.edgehub_twin_id() {
        crate::twins::push_desired(&io.state, &io.name, msg, version).await;
        return;
    }
    let Some(desired) = io.state.twins.desired(&io.name) else {
        return;
    };
    match io.state.set_edgehub_desired(&Value::Object(desired)).await {
        Ok(n) => tracing::info!(
            routes = n,
            version,
            "$edgeHub desired properties from the cloud applied"
        ),
        Err(e) => {
            tracing::error!(error = %e, "$edgeHub desired properties from the cloud refused; previous routes stay active");
        }
    }
}

/// The cloud's answer to reported patch `seq`; true = try it again later.
async fn on_reported(io: &LinkIo, seq: u64, status: u16) -> bool {
    match status {
        200..=299 => {}
        429 | 500.. => {
            tracing::debug!(identity = %io.name, status, "reported patch deferred by the cloud");
            return true;
        }
        _ => {
            // Sending it again would be refused again; it stays applied locally.
            tracing::warn!(identity = %io.name, status, seq, "the cloud refused a reported patch; dropping it");
        }
    }
    io.state.twins.reported_done(&io.name, seq).await;
    false
}

/// A PUBLISH from the cloud other than a twin response.
pub(super) async fn on_publish<W: AsyncWrite + Unpin>(
    io: &mut LinkIo,
    p: Publish,
    wr: &mut W,
) -> Result<Next, String> {
    let Ok(topic) = std::str::from_utf8(&p.topic).map(str::to_owned) else {
        return Err("a topic from the cloud is not UTF-8".into());
    };
    let qos1 = p.qos == QoS::AtLeastOnce;
    let c2d_prefix = format!("devices/{}/messages/devicebound/", io.name);
    if io.leaf && topic.starts_with(&c2d_prefix) {
        // Acknowledged upstream only once the leaf device has: PUBACK = complete.
        let tag = qos1.then_some(C2dTag::Mqtt(p.pkid));
        relay_c2d(io, topic, p.payload, tag);
        return Ok(Next::Continue);
    }
    if qos1 {
        write_packet(wr, &Packet::PubAck(PubAck::new(p.pkid))).await?;
    }
    if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
        return Ok(on_desired_patch(io, &p.payload).await);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let Some((method, query)) = rest.split_once('/') else {
            return Ok(Next::Continue);
        };
        let query = query.strip_prefix('?').unwrap_or(query);
        let Some(rid) = topic::query_param(query, "$rid") else {
            return Ok(Next::Continue);
        };
        relay_method(io, method.to_owned(), rid, p.payload);
        return Ok(Next::Continue);
    }
    tracing::debug!(identity = %io.name, %topic, "publish from the cloud on an unhandled topic ignored");
    Ok(Next::Continue)
}

/// A desired patch from the cloud (JSON with `$version`), whatever carried it.
pub(super) async fn on_desired_patch(io: &LinkIo, payload: &[u8]) -> Next {
    let Ok(patch) = serde_json::from_slice::<Value>(payload) else {
        tracing::warn!(identity = %io.name, "desired patch from the cloud is not JSON; resyncing");
        return Next::Resync;
    };
    match io.state.twins.cloud_desired_patch(&io.name, &patch).await {
        CloudPatch::Push(msg, version) => {
            desired_changed(io, &msg, version).await;
            Next::Continue
        }
        CloudPatch::Stale => Next::Continue,
        CloudPatch::Gap => Next::Resync,
    }
}

/// Relays a C2D message (`topic` = `devices/{d}/messages/devicebound/{bag}`)
/// to the downstream device; `tag` (none: nothing to settle upstream) comes
/// back in [`Op::C2dDone`]: delivered on the device's acknowledgement, not
/// delivered when it does not come in [`C2D_ACK_TIMEOUT`].
pub(super) fn relay_c2d(io: &mut LinkIo, topic: String, payload: Bytes, tag: Option<C2dTag>) {
    let generation = io.generation;
    let Some(conn) = io.state.sessions.deliverable(&io.name, &topic) else {
        // Left unsettled: locked in the cloud until this connection ends
        // (or its lock times out), then redelivered by its rules.
        tracing::info!(identity = %io.name, "C2D message for a device not connected here; left unacknowledged");
        return;
    };
    let ops = io.ops_tx.clone();
    let name = io.name.clone();
    let (tx, rx) = oneshot::channel();
    let out = Outbound {
        topic,
        payload,
        ack: tag.is_some().then_some(tx),
    };
    io.relays.spawn(async move {
        let delivered = async {
            conn.tx.send(out).await.ok()?;
            rx.await.ok()
        };
        let Some(tag) = tag else {
            // Nothing to acknowledge upstream (`rx` ends with the send).
            let _ = tokio::time::timeout(C2D_ACK_TIMEOUT, delivered).await;
            return;
        };
        let delivered = matches!(
            tokio::time::timeout(C2D_ACK_TIMEOUT, delivered).await,
            Ok(Some(()))
        );
        if !delivered {
            tracing::info!(identity = %name, "C2D message not acknowledged by the device");
        }
        let _ = ops
            .send(Op::C2dDone {
                generation,
                tag,
                delivered,
            })
            .await;
    });
}

/// Relays a cloud method call to the local client; the answer (or 404,
/// 429, 504) goes back as [`Op::MethodAnswer`] with request id `rid`.
pub(super) fn relay_method(io: &mut LinkIo, method: String, rid: String, payload: Bytes) {
    if io.relays.len() >= MAX_RELAYS {
        let _ = io.ops_tx.try_send(Op::MethodAnswer {
            rid,
            status: 429,
            payload: error_body("too many calls in progress"),
        });
        return;
    }
    let (state, name, ops) = (io.state.clone(), io.name.clone(), io.ops_tx.clone());
    state.metrics.direct_method("upstream", &name);
    io.relays.spawn(async move {
        let (status, payload) =
            match methods::relay(&state, &name, &method, payload, METHOD_TIMEOUT).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::info!(identity = %name, method = %method, error = %e, "cloud method call not answered locally");
                    (i64::from(e.status()), error_body(&e.to_string()))
                }
            };
        let _ = ops
            .send(Op::MethodAnswer {
                rid,
                status,
                payload,
            })
            .await;
    });
}

fn error_body(message: &str) -> Bytes {
    // Serializing a Value cannot fail.
    serde_json::to_vec(&serde_json::json!({ "message": message }))
        .unwrap_or_default()
        .into()
}
