//! One identity's session on the shared AMQP connection: the links IoT
//! Hub's AMQP dialect gives a device or module (`amqp-iothub.md` §3–4),
//! doing what the MQTT session of [`super::super::link`] does:
//!
//! * telemetry on `…/messages/events`, attached on the first message and
//!   detached after [`TELEMETRY_IDLE`] without one; up to the drain's
//!   window unsettled, each request acknowledged on `accepted` (the cloud's
//!   fsync), a `rejected` one settled as unsendable (it would be rejected
//!   again), no outcome within `ack_timeout_secs` = the link is lost;
//! * the twin on `…/twin` (a sender and a receiver paired by
//!   `com.microsoft:channel-correlation-id`): desired notifications
//!   subscribed by a PUT, then the GET; reported patches one at a time;
//!   responses matched by correlation id;
//! * direct methods on `…/methods/devicebound`: requests relayed to the
//!   local client, answers sent back with the request's correlation id;
//! * C2D on `…/messages/devicebound` for a downstream device, settled only
//!   when the device acknowledged it (accepted = complete), released
//!   (abandon) when it did not in time;
//! * its token put again before it expires, on the same session.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{Receiver, RecvError, SendError, Sender};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageAnnotations, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use tokio::time::Instant;
use verge_core::{ClientId, SharedAccessKey};

use super::super::link::{C2dTag, End, LinkIo, Next, Op, next_request};
use super::super::relay::{TwinReq, TwinState, on_desired_patch, relay_c2d, relay_method};
use super::super::{
    API_VERSION, Ack, HANDSHAKE_TIMEOUT, PIPELINE_BATCHES, RENEW_MARGIN_SECS, Request, Sent, Shared,
};
use super::{Opened, renew};

/// A telemetry link unused this long is detached (attached again on the
/// next message): an identity that only receives keeps no sender.
const TELEMETRY_IDLE: Duration = Duration::from_secs(60);
/// Credit given on receiving links (twin, methods, C2D); each delivery is
/// handled at once, so this only bounds a burst.
const RECEIVER_CREDIT: u32 = 32;

type Outcomes = Pin<Box<DeliveryFut<Result<Outcome, SendError>>>>;

/// The identity's links.
struct Links {
    twin_tx: Sender,
    twin_rx: Receiver,
    methods_tx: Sender,
    methods_rx: Receiver,
    c2d: Option<Receiver>,
    telemetry: Option<Sender>,
}

/// Serves `id`'s session until its links fail (lost), the cloud refuses
/// its token at renewal, or the hub stops.
pub(in crate::upstream) async fn session(
    shared: &Arc<Shared>,
    opened: Opened,
    id: &ClientId,
    signer: &ClientId,
    key: &SharedAccessKey,
    io: &mut LinkIo,
) -> End {
    let Opened {
        mut session,
        generation,
        first,
        mut expiry,
    } = opened;
    let end = match tokio::time::timeout(HANDSHAKE_TIMEOUT, attach_all(&mut session, id, io.leaf))
        .await
    {
        Ok(Ok(links)) => {
            let on = (generation, first);
            serve(
                shared,
                &mut session,
                on,
                &mut expiry,
                id,
                signer,
                key,
                io,
                links,
            )
            .await
        }
        Ok(Err(end)) => end,
        Err(_) => End::Lost("attaching the identity's links timed out".into()),
    };
    // Ending the session detaches its links; bounded, the connection may be gone.
    let _ = tokio::time::timeout(Duration::from_secs(1), session.end()).await;
    end
}

/// The attach properties IoT Hub's clients send; `channel` pairs a twin or
/// method link's two halves.
fn link_properties(channel: Option<&str>) -> Fields {
    let mut f = Fields::new();
    f.insert(
        Symbol::from("com.microsoft:api-version"),
        Value::String(API_VERSION.to_owned()),
    );
    f.insert(
        Symbol::from("com.microsoft:client-version"),
        Value::String(concat!("verge-hub/", env!("CARGO_PKG_VERSION")).to_owned()),
    );
    if let Some(c) = channel {
        f.insert(
            Symbol::from("com.microsoft:channel-correlation-id"),
            Value::String(c.to_owned()),
        );
    }
    f
}

/// Why an attach failed: refused as unauthorized (the identity's problem),
/// or anything else (the link's).
fn attach_failed(
    what: &str,
    remote: Option<&fe2o3_amqp::types::definitions::Error>,
    e: &dyn std::fmt::Display,
) -> End {
    if let Some(err) = remote
        && err.condition == ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
    {
        return End::Refused(format!(
            "{what} refused: {}",
            err.description.as_deref().unwrap_or("unauthorized")
        ));
    }
    End::Lost(format!("attaching {what}: {e}"))
}

async fn attach_sender(
    session: &mut SessionHandle<()>,
    what: &str,
    address: String,
    channel: Option<&str>,
) -> Result<Sender, End> {
    let name = format!("{what}-{}", uuid::Uuid::new_v4().simple());
    Sender::builder()
        .name(name)
        .target(address)
        .properties(link_properties(channel))
        .attach(session)
        .await
        .map_err(|e| {
            let remote = match &e {
                fe2o3_amqp::link::SenderAttachError::RemoteClosedWithError(err) => Some(err),
                _ => None,
            };
            attach_failed(what, remote, &e)
        })
}

async fn attach_receiver(
    session: &mut SessionHandle<()>,
    what: &str,
    address: String,
    channel: Option<&str>,
) -> Result<Receiver, End> {
    let name = format!("{what}-{}", uuid::Uuid::new_v4().simple());
    Receiver::builder()
        .name(name)
        .source(address)
        .properties(link_properties(channel))
        .credit_mode(CreditMode::Auto(RECEIVER_CREDIT))
        .attach(session)
        .await
        .map_err(|e| {
            let remote = match &e {
                fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(err) => Some(err),
                _ => None,
            };
            attach_failed(what, remote, &e)
        })
}

async fn attach_all(
    session: &mut SessionHandle<()>,
    id: &ClientId,
    leaf: bool,
) -> Result<Links, End> {
    let res = id.resource();
    let twin = format!("twin:{}", uuid::Uuid::new_v4());
    let methods = format!("methods:{}", uuid::Uuid::new_v4());
    let twin_tx = attach_sender(session, "twin-sender", format!("{res}/twin"), Some(&twin)).await?;
    let twin_rx =
        attach_receiver(session, "twin-receiver", format!("{res}/twin"), Some(&twin)).await?;
    let address = format!("{res}/methods/devicebound");
    let methods_tx =
        attach_sender(session, "methods-sender", address.clone(), Some(&methods)).await?;
    let methods_rx = attach_receiver(session, "methods-receiver", address, Some(&methods)).await?;
    let c2d = if leaf {
        Some(
            attach_receiver(
                session,
                "c2d-receiver",
                format!("{res}/messages/devicebound"),
                None,
            )
            .await?,
        )
    } else {
        None
    };
    Ok(Links {
        twin_tx,
        twin_rx,
        methods_tx,
        methods_rx,
        c2d,
        telemetry: None,
    })
}

/// A twin request: `operation` (and `resource`) annotations, `cid` as the
/// correlation id.
fn twin_request(
    cid: &str,
    operation: &str,
    resource: Option<&str>,
    body: &[u8],
) -> Message<Body<Value>> {
    let mut ma = MessageAnnotations::builder().insert(
        Symbol::from("operation"),
        Value::String(operation.to_owned()),
    );
    if let Some(r) = resource {
        ma = ma.insert(Symbol::from("resource"), Value::String(r.to_owned()));
    }
    Message::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::String(cid.to_owned())),
            ..Properties::default()
        })
        .message_annotations(ma.build())
        .body(verge_amqp::convert::data_body(body))
        .build()
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(i64::from(*n)),
        Value::Long(n) => Some(*n),
        Value::Uint(n) => Some(i64::from(*n)),
        Value::Short(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn correlation(msg: &Message<Body<Value>>) -> Option<&MessageId> {
    msg.properties.as_ref()?.correlation_id.as_ref()
}

fn body_of(msg: &Message<Body<Value>>) -> Bytes {
    verge_amqp::convert::body_bytes(&msg.body).unwrap_or_default()
}

/// The AMQP message of a telemetry request (its MQTT topic carries the
/// property bag after `/messages/events/`).
fn telemetry_message(topic: &str, payload: Bytes) -> Message<Body<Value>> {
    let bag = topic
        .split_once("/messages/events/")
        .map_or("", |(_, bag)| bag);
    verge_amqp::convert::telemetry_from_bag(bag, payload)
}

async fn recv(rx: &mut Option<Receiver>) -> Result<Delivery<Body<Value>>, RecvError> {
    match rx {
        Some(r) => r.recv::<Body<Value>>().await,
        None => std::future::pending().await,
    }
}

/// Settles a telemetry request by the cloud's outcome; an error ends the
/// session (what was not taken goes again from the store, in order).
fn settle(name: &str, ack: Ack, o: Result<Outcome, SendError>) -> Result<(), End> {
    match o {
        Ok(Outcome::Accepted(_)) => ack.send(Sent::Acked),
        Ok(Outcome::Rejected(r)) => {
            // The cloud would reject it again: settled, counted.
            tracing::warn!(identity = %name, error = ?r.error, "the cloud rejected an upstream message");
            ack.send(Sent::Unsendable);
        }
        Ok(other) => {
            // Released or modified: not taken; the link starts over.
            drop(ack);
            return Err(End::Lost(format!(
                "the cloud did not take a message: {other:?}"
            )));
        }
        Err(e) => {
            drop(ack);
            return Err(End::Lost(format!("telemetry: {e}")));
        }
    }
    Ok(())
}

async fn front(inflight: &mut VecDeque<(Instant, Ack, Outcomes)>) -> Result<Outcome, SendError> {
    match inflight.front_mut() {
        Some((_, _, fut)) => fut.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Arc<Shared>,
    session: &mut SessionHandle<()>,
    on: (u64, bool),
    expiry: &mut u64,
    id: &ClientId,
    signer: &ClientId,
    key: &SharedAccessKey,
    io: &mut LinkIo,
    mut links: Links,
) -> End {
    let Some(mux) = shared.amqp.as_ref() else {
        return End::Closed;
    };
    let cfg = &shared.up.cfg;

    let mut busy_at = Instant::now();
    let max_inflight = cfg.batch_size.max(1) * PIPELINE_BATCHES;
    let ack_timeout = Duration::from_secs(cfg.ack_timeout_secs);
    let res = id.resource();
    let mut inflight: VecDeque<(Instant, Ack, Outcomes)> = VecDeque::new();
    let mut last_sent = Instant::now();
    let mut twin = TwinState::new(ack_timeout);
    let mut next_cid: u64 = 0;
    let mut cid = |prefix: &str| {
        next_cid += 1;
        format!("{prefix}{next_cid:x}")
    };
    // Method calls relayed, by the request id given to the relay: the
    // cloud's correlation id, echoed in the answer as it came.
    let mut methods: HashMap<String, MessageId> = HashMap::new();
    let mut next_method: u64 = 0;

    // Desired notifications first, then the twin: a patch between the two
    // is then already in the GET's answer or pushed after it.
    for (kind, op, resource) in [
        (
            TwinReq::Subscribe,
            "PUT",
            Some("/notifications/twin/properties/desired"),
        ),
        (TwinReq::Sync, "GET", None),
    ] {
        let c = cid(op);
        let msg = twin_request(&c, op, resource, b"");
        if let Err(e) = links.twin_tx.send_batchable(msg).await {
            return End::Lost(format!("twin request: {e}"));
        }
        twin.sent(c, kind);
    }

    loop {
        io.reported.borrow_and_update();
        if let Some(p) = twin.next_reported(io) {
            let c = cid("Patch");
            let body = serde_json::to_vec(&p.patch).unwrap_or_default();
            let msg = twin_request(&c, "PATCH", Some("/properties/reported"), &body);
            if let Err(e) = links.twin_tx.send_batchable(msg).await {
                return End::Lost(format!("twin request: {e}"));
            }
            twin.sent(c, TwinReq::Reported(p.seq));
        }
        let twin_deadline = twin.deadline();
        let ack_deadline = inflight.front().map(|(at, _, _)| *at + ack_timeout);
        let idle_at =
            (links.telemetry.is_some() && inflight.is_empty()).then(|| last_sent + TELEMETRY_IDLE);
        // Idle: nothing in flight either way, nothing else waiting on it.
        if !(inflight.is_empty() && twin.is_empty() && io.quiet()) {
            busy_at = Instant::now();
        }
        let close_at = io.idle_limit.map(|limit| busy_at + limit);
        let renew_at = Instant::now()
            + Duration::from_secs(
                expiry.saturating_sub(crate::auth::unix_now() + RENEW_MARGIN_SECS),
            );
        tokio::select! {
            r = next_request(&mut io.stash, &mut io.rx), if inflight.len() < max_inflight => {
                let Some(mut req) = r else { return End::Closed };
                busy_at = Instant::now();
                loop {
                    if req.epoch != io.epoch || req.ack.is_closed() {
                        // Sent before a lost connection, or abandoned by the
                        // drain: it goes out again from the store, in order.
                        drop(req);
                    } else {
                        if links.telemetry.is_none() {
                            match attach_sender(session, "telemetry", format!("{res}/messages/events"), None).await {
                                Ok(s) => links.telemetry = Some(s),
                                Err(end) => return end,
                            }
                        }
                        let Some(sender) = links.telemetry.as_mut() else {
                            return End::Lost("no telemetry link".into());
                        };
                        let Request { topic, payload, ack, .. } = req;
                        let msg = telemetry_message(&topic, payload);
                        match sender.send_batchable(msg).await {
                            Ok(fut) => inflight.push_back((Instant::now(), ack, Box::pin(fut))),
                            Err(SendError::MessageSizeExceeded(e)) => {
                                tracing::warn!(identity = %io.name, error = ?e, "upstream message larger than the cloud accepts");
                                ack.send(Sent::Unsendable);
                            }
                            Err(e) => return End::Lost(format!("telemetry: {e}")),
                        }
                        last_sent = Instant::now();
                    }
                    if inflight.len() >= max_inflight {
                        break;
                    }
                    match io.rx.try_recv() {
                        Ok(next) => req = next,
                        Err(_) => break,
                    }
                }
            }
            o = front(&mut inflight) => {
                let Some((_, ack, _)) = inflight.pop_front() else { continue };
                if let Err(end) = settle(&io.name, ack, o) {
                    return end;
                }
                // Every other outcome already in, in one go: one turn of
                // this loop per disposition frame, not per message.
                while let Some((_, _, fut)) = inflight.front_mut() {
                    let Some(o) = futures_util::FutureExt::now_or_never(fut.as_mut()) else {
                        break;
                    };
                    let Some((_, ack, _)) = inflight.pop_front() else { break };
                    if let Err(end) = settle(&io.name, ack, o) {
                        return end;
                    }
                }
            }
            d = links.twin_rx.recv::<Body<Value>>() => {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => return End::Lost(format!("twin link: {e}")),
                };
                let _ = links.twin_rx.accept(&d).await;
                let msg = d.message();
                let matched = match correlation(msg) {
                    Some(MessageId::String(c)) => twin.take(c),
                    _ => None,
                };
                let next = match matched {
                    Some(kind) => {
                        // A response without a status reads as a server error.
                        let status = verge_amqp::convert::annotation(msg, "status")
                            .and_then(int_of)
                            .and_then(|s| u16::try_from(s).ok())
                            .unwrap_or(500);
                        twin.answered(io, kind, status, &body_of(msg)).await;
                        Next::Continue
                    }
                    // No request of ours: a desired-properties notification.
                    None => on_desired_patch(io, &body_of(msg)).await,
                };
                if matches!(next, Next::Resync) && !twin.syncing() {
                    let c = cid("GET");
                    if let Err(e) = links.twin_tx.send_batchable(twin_request(&c, "GET", None, b"")).await {
                        return End::Lost(format!("twin request: {e}"));
                    }
                    twin.sent(c, TwinReq::Sync);
                }
            }
            d = links.methods_rx.recv::<Body<Value>>() => {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => return End::Lost(format!("methods link: {e}")),
                };
                let _ = links.methods_rx.accept(&d).await;
                let msg = d.message();
                let name = msg
                    .application_properties
                    .as_ref()
                    .and_then(|a| a.0.get("IoThub-methodname"))
                    .and_then(|v| match v { SimpleValue::String(s) => Some(s.clone()), _ => None });
                let (Some(name), Some(cid)) = (name, correlation(msg).cloned()) else {
                    tracing::debug!(identity = %io.name, "method request without a name or correlation id; ignored");
                    continue;
                };
                next_method += 1;
                let rid = format!("{next_method:x}");
                methods.insert(rid.clone(), cid);
                relay_method(io, name, rid, body_of(msg));
            }
            d = recv(&mut links.c2d) => {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => return End::Lost(format!("C2D link: {e}")),
                };
                let info = fe2o3_amqp::link::delivery::DeliveryInfo::from(&d);
                match verge_amqp::convert::to_bag(d.message()) {
                    Ok((bag, payload)) => {
                        let topic = format!("devices/{}/messages/devicebound/{bag}", io.name);
                        relay_c2d(io, topic, payload, Some(C2dTag::Amqp(info)));
                    }
                    Err(e) => {
                        tracing::warn!(identity = %io.name, error = %e, "C2D message from the cloud cannot be read; rejected");
                        if let Some(c2d) = &links.c2d {
                            let _ = c2d.reject(info, None).await;
                        }
                    }
                }
            }
            Some(op) = io.ops_rx.recv() => match op {
                Op::MethodAnswer { rid, status, payload } => {
                    let Some(cid) = methods.remove(&rid) else { continue };
                    let msg = Message::builder()
                        .properties(Properties {
                            correlation_id: Some(cid),
                            ..Properties::default()
                        })
                        .application_properties(
                            ApplicationProperties::builder()
                                .insert(
                                    "IoThub-status".to_owned(),
                                    SimpleValue::Int(i32::try_from(status).unwrap_or(500)),
                                )
                                .build(),
                        )
                        .body(verge_amqp::convert::data_body(&payload))
                        .build();
                    // Its outcome is not waited for: the caller hears the
                    // answer or times out, as over MQTT (QoS 0).
                    if let Err(e) = links.methods_tx.send_batchable(msg).await {
                        return End::Lost(format!("methods link: {e}"));
                    }
                }
                Op::C2dDone { generation: g, tag: C2dTag::Amqp(info), delivered } if g == io.generation => {
                    if let Some(c2d) = &links.c2d {
                        let r = if delivered {
                            c2d.accept(info).await
                        } else {
                            c2d.release(info).await
                        };
                        if let Err(e) = r {
                            tracing::debug!(identity = %io.name, error = %e, "C2D settlement not sent");
                        }
                    }
                }
                Op::C2dDone { .. } => {}
            },
            Ok(()) = io.reported.changed() => {}
            () = sleep_until_opt(twin.retry_at()) => {}
            () = sleep_until_opt(twin_deadline) => twin.expire(&io.name),
            Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
            () = sleep_until_opt(ack_deadline) => {
                return End::Lost(format!("no disposition within {}s", cfg.ack_timeout_secs));
            }
            () = sleep_until_opt(close_at) => {
                // Checked again at the deadline (a client may have connected).
                if io.quiet() && io.rx.is_empty() {
                    return End::Idle;
                }
                busy_at = Instant::now();
            }
            () = sleep_until_opt(idle_at) => {
                if let Some(s) = links.telemetry.take() {
                    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, s.close()).await;
                }
            }
            () = tokio::time::sleep_until(renew_at) => {
                match renew(mux, &shared.up, on, id, signer, key).await {
                    Ok(e) => *expiry = e,
                    Err(super::super::link::ConnectError::Refused(why)) => return End::Refused(why),
                    Err(super::super::link::ConnectError::Failed(why)) => return End::Lost(why),
                }
            }
        }
    }
}
