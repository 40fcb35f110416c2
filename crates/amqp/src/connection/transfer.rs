//! The loops of an identity's links once they are open: telemetry and
//! module outputs in (settled after the backend made them durable, batches
//! whole), the backend's deliveries out (module inputs, C2D, twin
//! notifications, method requests), and the request/response links (twin,
//! methods).

use super::*;

impl<B: Backend> Shared<B> {
    /// A telemetry / module-output link: each transfer is settled
    /// `Accepted` only once the backend made it durable; a batch (several
    /// messages in one transfer) once all of them are, or `Rejected` if
    /// any was refused (the client then sends the whole batch again).
    pub(super) async fn telemetry(
        self: Arc<Self>,
        client: ClientId,
        mut receiver: Receiver,
        ident: CancellationToken,
    ) {
        let backend = &*self.backend;
        // One entry per message submitted; a transfer's settlement rides on
        // the entry of its last message.
        let mut pending: VecDeque<(Option<Settle>, B::Pending)> = VecDeque::new();
        // The first refusal among the messages of the transfer at the front.
        let mut refused_part: Option<definitions::Error> = None;
        let end = loop {
            tokio::select! {
                () = ident.cancelled() => break None,
                () = self.tokens.expired(&client) => {
                    tracing::info!(peer = %self.peer, %client, "AMQP token expired; closing the identity's link");
                    break Some(error(AmqpError::UnauthorizedAccess, "token expired"));
                }
                r = oldest(backend, &mut pending), if !pending.is_empty() => {
                    let Some((settle, _)) = pending.pop_front() else { continue };
                    if let Err(e) = r {
                        tracing::warn!(%client, reason = %e, "AMQP message not stored");
                        refused_part.get_or_insert_with(|| rejection_error(&e));
                    }
                    let Some(Settle { info, refuse }) = settle else { continue };
                    if let Some(e) = refuse.or(refused_part.take()) {
                        if receiver.reject(info, e).await.is_err() {
                            break None;
                        }
                        continue;
                    }
                    // The transfers behind it that are durable already (one
                    // group commit makes many so) settle in the same
                    // disposition frame: fe2o3 costs several task hand-offs
                    // per frame.
                    let mut accepted = vec![info];
                    let mut then_reject = None;
                    while then_reject.is_none() {
                        let Some((_, p)) = pending.front_mut() else { break };
                        let Some(r) = ready_now(backend.telemetry_wait(p)) else { break };
                        let Some((settle, _)) = pending.pop_front() else { break };
                        if let Err(e) = r {
                            tracing::warn!(%client, reason = %e, "AMQP message not stored");
                            refused_part.get_or_insert_with(|| rejection_error(&e));
                        }
                        let Some(Settle { info, refuse }) = settle else { continue };
                        match refuse.or(refused_part.take()) {
                            None => accepted.push(info),
                            Some(e) => then_reject = Some((info, e)),
                        }
                    }
                    let mut sent = receiver.accept_all(accepted).await.is_ok();
                    if let Some((info, e)) = then_reject {
                        sent = sent && receiver.reject(info, e).await.is_ok();
                    }
                    if !sent {
                        break None;
                    }
                }
                d = receiver.recv::<Body<Value>>(), if pending.len() < INBOUND_WINDOW => {
                    let Ok(d) = d else { break None };
                    let parts = match parts_of(&d) {
                        Ok(parts) => parts,
                        Err(e) => {
                            tracing::info!(%client, reason = ?e.description, "AMQP message rejected");
                            if receiver.reject(&d, e).await.is_err() {
                                break None;
                            }
                            continue;
                        }
                    };
                    let mut submitted = 0;
                    let mut refuse = None;
                    for (bag, payload) in parts {
                        match backend.telemetry_submit(&client, &bag, payload).await {
                            Ok(p) => {
                                pending.push_back((None, p));
                                submitted += 1;
                            }
                            Err(e) => {
                                tracing::info!(%client, reason = %e, "AMQP message rejected");
                                refuse = Some(rejection_error(&e));
                                break;
                            }
                        }
                    }
                    let info = DeliveryInfo::from(d);
                    if submitted > 0 {
                        if let Some(last) = pending.back_mut() {
                            last.0 = Some(Settle { info, refuse });
                        }
                        continue;
                    }
                    // Nothing queued: settle now (an empty batch is accepted).
                    let sent = match refuse {
                        None => receiver.accept(info).await,
                        Some(e) => receiver.reject(info, e).await,
                    };
                    if sent.is_err() {
                        break None;
                    }
                }
            }
        };
        finish_receiver(receiver, end).await;
    }

    /// One of an identity's sender links (module inputs, twin responses and
    /// desired patches, method requests, C2D): sends what is routed to it
    /// and acknowledges to the backend what the client accepts.
    ///
    /// C2D settles as IoT Hub's AMQP does: accepted = complete, rejected =
    /// reject (never redelivered), released or modified = abandon (the
    /// backend redelivers). The backend's acknowledgement has only two
    /// answers, so a reject is acknowledged like a completion (the hub's
    /// MQTT upstream has no reject either: it completes the message, which
    /// the cloud then does not redeliver, and the hub logs the reject).
    pub(super) async fn push_link(
        self: Arc<Self>,
        client: ClientId,
        mut sender: Sender,
        ident: CancellationToken,
        routes: Arc<std::sync::Mutex<Routes>>,
        kind: PushKind,
    ) {
        let (tx, mut rx) = mpsc::channel::<Push>(OUTBOUND_QUEUE);
        // A new link of the same kind replaces the previous one (as edgeHub).
        *lock_routes(&routes).slot(kind) = Some(tx.clone());
        let client_id = client.to_string();
        let filter = crate::links::filter(&client, kind);
        let sessions = self.backend.sessions();
        if let Some(f) = &filter {
            sessions.subscribe(&client_id, std::slice::from_ref(f));
        }
        let end = loop {
            let push = tokio::select! {
                () = ident.cancelled() => break None,
                () = self.tokens.expired(&client) => break Some(error(AmqpError::UnauthorizedAccess, "token expired")),
                p = rx.recv() => match p { Some(p) => p, None => break None },
                // The client detached it or ended its session (an edge hub
                // ending an idle identity's session): the link is gone now,
                // not at the next push. Only ATTACH/DETACH reach a sender's
                // reader, so nothing else is consumed here.
                _ = sender.on_detach() => break None,
            };
            // Biased to the outcome: when the client settled and its
            // connection's end is seen in the same poll, the settlement counts.
            let outcome = tokio::select! {
                biased;
                o = sender.send(push.msg) => o,
                () = ident.cancelled() => break None,
            };
            match outcome {
                Ok(Outcome::Accepted(_)) => {
                    if let Some(ack) = push.ack {
                        let _ = ack.send(());
                    }
                }
                Ok(Outcome::Rejected(r)) if matches!(kind, PushKind::C2d) => {
                    tracing::info!(%client, error = ?r.error, "C2D message rejected by the device; not redelivered");
                    if let Some(ack) = push.ack {
                        let _ = ack.send(());
                    }
                }
                // Not accepted: dropping the ack leaves the message to the
                // backend's redelivery.
                Ok(o) => {
                    tracing::debug!(%client, ?kind, outcome = ?o, "AMQP delivery not accepted")
                }
                Err(e) => {
                    tracing::info!(%client, ?kind, error = %e, "AMQP sender link ended");
                    break None;
                }
            }
        };
        {
            let mut r = lock_routes(&routes);
            let slot = r.slot(kind);
            if slot.as_ref().is_some_and(|s| s.same_channel(&tx)) {
                *slot = None;
            }
        }
        if let Some(f) = filter {
            sessions.unsubscribe(&client_id, &[f]);
        }
        let fut = async {
            match end {
                Some(e) => sender.close_with_error(e).await,
                None => sender.close().await,
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, fut).await;
    }

    /// A settled request link: twin requests (GET, PATCH reported,
    /// PUT/DELETE desired notifications; answered on the identity's twin
    /// sender link) or method responses (handed to the backend).
    pub(super) async fn request_link(
        self: Arc<Self>,
        client: ClientId,
        mut receiver: Receiver,
        ident: CancellationToken,
        routes: Arc<std::sync::Mutex<Routes>>,
        kind: Kind,
    ) {
        let end = loop {
            let d = tokio::select! {
                () = ident.cancelled() => break None,
                () = self.tokens.expired(&client) => break Some(error(AmqpError::UnauthorizedAccess, "token expired")),
                d = receiver.recv::<Body<Value>>() => match d { Ok(d) => d, Err(_) => break None },
            };
            if receiver.accept(&d).await.is_err() {
                break None;
            }
            if kind == Kind::Twin {
                let reply = crate::links::twin_request(&*self.backend, &client, d.message()).await;
                let route = lock_routes(&routes).twin.clone();
                // No twin receiver link, no answer (the request was settled).
                if let Some(route) = route {
                    let _ = route
                        .send(Push {
                            msg: reply,
                            ack: None,
                        })
                        .await;
                }
                continue;
            }
            match crate::links::method_response(d.message(), &routes) {
                Ok((rid, status, payload)) => {
                    self.backend
                        .method_response(&client, &rid, status, payload)
                        .await;
                }
                Err(why) => tracing::info!(%client, why, "AMQP method response ignored"),
            }
        };
        finish_receiver(receiver, end).await;
    }
}

/// Waits for the oldest pending submission to be durable.
/// How a telemetry transfer settles once its last message is durable.
struct Settle {
    info: DeliveryInfo,
    /// A refusal already known (a message of the batch the backend refused).
    refuse: Option<definitions::Error>,
}

/// The messages of one telemetry transfer as property bags and payloads:
/// one, or each of a batch's (`convert::BATCH_FORMAT`); what cannot be
/// taken is the transfer's rejection.
fn parts_of(d: &Delivery<Body<Value>>) -> Result<Vec<(String, bytes::Bytes)>, definitions::Error> {
    let limit = verge_core::message::MAX_MESSAGE_SIZE;
    let one = |m: &Message<Body<Value>>| match convert::to_bag(m) {
        Err(e) => Err(error(AmqpError::DecodeError, e.to_string())),
        Ok((bag, payload)) if payload.len() + bag.len() > limit => Err(error(
            AmqpError::ResourceLimitExceeded,
            "message exceeds 256 KB",
        )),
        Ok(part) => Ok(part),
    };
    match d.message_format() {
        None | Some(0) => Ok(vec![one(d.message())?]),
        Some(convert::BATCH_FORMAT) => {
            let messages = convert::batch_messages(&d.message().body)
                .map_err(|e| error(AmqpError::DecodeError, e.to_string()))?;
            let parts = messages.iter().map(one).collect::<Result<Vec<_>, _>>()?;
            // IoT Hub's limit holds for a batch as a whole.
            if parts.iter().map(|(b, p)| b.len() + p.len()).sum::<usize>() > limit {
                return Err(error(
                    AmqpError::ResourceLimitExceeded,
                    "batch exceeds 256 KB",
                ));
            }
            Ok(parts)
        }
        Some(f) => Err(error(
            AmqpError::NotImplemented,
            format!("message format {f:#x} is not supported"),
        )),
    }
}

/// `f`'s output if it is ready at the first poll (a durability wait whose
/// group commit already happened), without waiting.
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

async fn oldest<B: Backend>(
    backend: &B,
    pending: &mut VecDeque<(Option<Settle>, B::Pending)>,
) -> Result<(), verge_endpoint::Rejection> {
    match pending.front_mut() {
        Some((_, p)) => backend.telemetry_wait(p).await,
        None => std::future::pending().await,
    }
}

async fn finish_receiver(receiver: Receiver, end: Option<definitions::Error>) {
    let fut = async {
        match end {
            Some(e) => receiver.close_with_error(e).await,
            None => receiver.close().await,
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, fut).await;
}
