//! The client side of IoT Hub's claims-based security node (`$cbs`,
//! `amqp-iothub.md` §2): one sender and one reply receiver per connection,
//! a put-token per identity. Requests are pipelined — each carries its own
//! message id and the answer echoes it as correlation id — so 200
//! identities coming up after an outage cost one round trip, not 200.
//! (fe2o3-amqp-cbs waits for each answer before the next request.)

use std::collections::HashMap;
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Timestamp, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::super::link::ConnectError;

/// The `$cbs` node's address.
const NODE: &str = "$cbs";
/// Our reply node: the receiver's target and every request's `reply-to`.
const REPLY_TO: &str = "cbs";
/// The token type IoT Hub's CBS node takes for SAS tokens.
const TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// Put-tokens queued for the sender task at most.
const QUEUE: usize = 512;

type Reply = oneshot::Sender<Result<(), ConnectError>>;

/// A connection's `$cbs` links and the put-tokens awaiting an answer.
///
/// Requests are sent by a task of their own: a sender waiting for credit
/// must not stop the answers from being read (the cloud may hold its
/// credit until we settle its answers).
pub(super) struct Cbs {
    requests: mpsc::Sender<Message<Body<Value>>>,
    sending: tokio::task::JoinHandle<String>,
    receiver: Receiver,
    next_id: u64,
    /// By message id: when sent, the audience, who waits.
    pending: HashMap<u64, (Instant, String, Reply)>,
}

impl Drop for Cbs {
    fn drop(&mut self) {
        self.sending.abort();
    }
}

impl Cbs {
    /// Attaches the request sender and the reply receiver.
    pub(super) async fn attach(session: &mut SessionHandle<()>) -> Result<Cbs, String> {
        let mut sender = Sender::builder()
            .name("cbs-sender")
            .target(NODE)
            .attach(session)
            .await
            .map_err(|e| format!("AMQP attach $cbs sender: {e}"))?;
        let receiver = Receiver::builder()
            .name("cbs-receiver")
            .source(NODE)
            .target(REPLY_TO)
            .attach(session)
            .await
            .map_err(|e| format!("AMQP attach $cbs receiver: {e}"))?;
        let (requests, mut rx) = mpsc::channel::<Message<Body<Value>>>(QUEUE);
        let sending = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                // Its acceptance is not waited for: the answer says it all.
                if let Err(e) = sender.send_batchable(msg).await {
                    return format!("CBS put-token not sent: {e}");
                }
            }
            "CBS sender stopped".to_owned()
        });
        Ok(Cbs {
            requests,
            sending,
            receiver,
            next_id: 0,
            pending: HashMap::new(),
        })
    }

    /// Queues a put-token of `token` for `audience`; `reply` gets the
    /// answer. An error is the connection's (its `$cbs` sender stopped).
    pub(super) fn put(
        &mut self,
        audience: &str,
        token: String,
        expiry: u64,
        reply: Reply,
    ) -> Result<(), String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut app = ApplicationProperties::builder()
            .insert("operation".to_owned(), SimpleValue::from("put-token"))
            .insert("type".to_owned(), SimpleValue::from(TOKEN_TYPE))
            .insert("name".to_owned(), SimpleValue::from(audience));
        if let Ok(ms) = i64::try_from(expiry.saturating_mul(1000)) {
            app = app.insert(
                "expiration".to_owned(),
                SimpleValue::Timestamp(Timestamp::from_milliseconds(ms)),
            );
        }
        let msg = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(id)),
                reply_to: Some(REPLY_TO.to_owned()),
                ..Properties::default()
            })
            .application_properties(app.build())
            .body(Body::Value(AmqpValue(Value::String(token))))
            .build();
        match self.requests.try_send(msg) {
            Ok(()) => {
                tracing::debug!(audience, id, "CBS put-token queued");
                self.pending
                    .insert(id, (Instant::now(), audience.to_owned(), reply));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Bounded: each identity has one request at a time, so
                // this means a cloud that stopped reading; the identity
                // tries again.
                let _ = reply.send(Err(ConnectError::Failed(
                    "too many CBS put-tokens waiting to be sent".into(),
                )));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let why = "CBS sender stopped".to_owned();
                let _ = reply.send(Err(ConnectError::Failed(why.clone())));
                Err(why)
            }
        }
    }

    /// Waits for one answer and hands it to its requester. Cancel-safe. An
    /// error is the connection's (the reply link failed).
    pub(super) async fn answer(&mut self) -> Result<(), String> {
        let d = tokio::select! {
            d = self.receiver.recv::<Body<Value>>() => d.map_err(|e| format!("CBS reply link: {e}"))?,
            why = &mut self.sending => {
                return Err(why.unwrap_or_else(|e| format!("CBS sender: {e}")));
            }
        };
        let _ = self.receiver.accept(&d).await;
        let msg = d.message();
        tracing::debug!(properties = ?msg.properties, application = ?msg.application_properties, "CBS answer");
        let id = match msg
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
        {
            Some(MessageId::Ulong(n)) => *n,
            other => {
                tracing::debug!(correlation = ?other, "CBS answer to no request of ours");
                return Ok(());
            }
        };
        let Some((_, audience, reply)) = self.pending.remove(&id) else {
            return Ok(());
        };
        let app = msg.application_properties.as_ref();
        let status = app
            .and_then(|a| a.0.get("status-code").or_else(|| a.0.get("statusCode")))
            .and_then(|v| match v {
                SimpleValue::Int(n) => Some(i64::from(*n)),
                SimpleValue::Long(n) => Some(*n),
                SimpleValue::Uint(n) => Some(i64::from(*n)),
                SimpleValue::Ushort(n) => Some(i64::from(*n)),
                SimpleValue::Short(n) => Some(i64::from(*n)),
                _ => None,
            });
        let description = app
            .and_then(|a| {
                a.0.get("status-description")
                    .or_else(|| a.0.get("statusDescription"))
            })
            .and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let result = match status {
            Some(200..=299) => Ok(()),
            // The identity or its token: trying again at once would be refused again.
            Some(s @ 400..=499) => Err(ConnectError::Refused(format!(
                "CBS put-token for {audience}: {s} {description}"
            ))),
            Some(s) => Err(ConnectError::Failed(format!(
                "CBS put-token for {audience}: {s} {description}"
            ))),
            None => Err(ConnectError::Failed(format!(
                "CBS answer for {audience} without a status code"
            ))),
        };
        let _ = reply.send(result);
        Ok(())
    }

    /// Fails the put-tokens unanswered for longer than `limit`.
    pub(super) fn expire(&mut self, limit: Duration) {
        let now = Instant::now();
        self.pending
            .retain(|_, (at, _, _)| now.duration_since(*at) < limit);
        // Dropped replies read as "the connection task stopped" — a failure
        // the identity retries after its interval.
    }

    /// Fails every put-token waiting (the connection ended).
    pub(super) fn fail_all(&mut self, why: &str) {
        for (_, (_, _, reply)) in self.pending.drain() {
            let _ = reply.send(Err(ConnectError::Failed(why.to_owned())));
        }
    }
}
