//! Router glue: turns a telemetry publish into a stamped [`Message`], routes
//! it with `verge-route` and stores it with `verge-store` for every endpoint.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;
use verge_core::ClientId;
use verge_core::message::{
    MAX_TOPIC_LEN, Message, MessageKind, SystemProperties, decode_bag, encoded_bag_len,
};
use verge_core::time::Timestamp;
use verge_route::{Endpoint, Scratch};
use verge_store::{AppendReceipt, Target};

use crate::HubState;

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The property bag could not be decoded.
    #[error("bad property bag: {0}")]
    Bag(#[from] verge_core::message::BagError),
    /// Over 256 KB.
    #[error("{0}")]
    TooLarge(#[from] verge_core::message::MessageTooLarge),
    /// A topic it would be delivered on does not fit MQTT's limit.
    #[error(
        "its property bag would make a {len}-byte delivery topic (percent-encoded); the MQTT limit is {limit}"
    )]
    TopicTooLong {
        /// The longest delivery topic it would need, bytes.
        len: usize,
        /// [`verge_core::message::MAX_TOPIC_LEN`].
        limit: usize,
    },
    /// The store refused it.
    #[error("store: {0}")]
    Store(#[from] verge_store::StoreError),
}

/// What happened to an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored for this many endpoints.
    Stored(usize),
    /// No route matched: dropped (and counted).
    Dropped,
}

/// Builds the message a client sent from its bag and body, stamped with the
/// sender's identity, the enqueue time and a message id if it had none.
pub fn build_message(client: &ClientId, bag: &str, body: Bytes) -> Result<Message, IngestError> {
    let (mut system, properties) = decode_bag(bag)?;
    system.connection_device_id = Some(client.device.to_string());
    system.connection_module_id = client.module.as_ref().map(ToString::to_string);
    if client.module.is_none() {
        system.output_name = None;
    }
    system.input_name = None;
    system.enqueued_time = Some(Timestamp::now());
    if system.message_id.is_none() {
        system.message_id = Some(new_message_id());
    }
    let msg = Message {
        kind: MessageKind::Telemetry,
        body,
        system,
        properties,
    };
    msg.check_size()?;
    Ok(msg)
}

/// A fresh message id: a random-looking v4 UUID. The 122 random bits are
/// drawn once per process and a counter is added, which keeps ids unique
/// (within 2^62 messages) without a `getrandom` call per message.
fn new_message_id() -> String {
    static SEED: OnceLock<u128> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u128());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let bits = seed.wrapping_add(u128::from(n));
    uuid::Builder::from_random_bytes(bits.to_be_bytes())
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// An accepted message whose store append may still be in flight
/// ([`ingest_submit`]); [`Pending::wait`] completes when it is durable.
#[derive(Debug)]
pub struct Pending {
    /// `None`: no route matched, nothing to wait for.
    receipt: Option<AppendReceipt>,
    /// The pumps to wake once it is durable.
    wake: Wake,
    targets: usize,
}

impl Pending {
    /// Waits until the append is durable, then counts it and wakes the
    /// pumps of its endpoints. Cancel-safe (the waking happens in the poll
    /// that completes it); must not be polled again after it completed.
    pub async fn wait(&mut self, state: &HubState) -> Result<Ingested, IngestError> {
        let Some(receipt) = self.receipt.as_mut() else {
            return Ok(Ingested::Dropped);
        };
        receipt.await?;
        self.receipt = None;
        state.stats.stored.fetch_add(1, Ordering::Relaxed);
        self.wake.notify();
        Ok(Ingested::Stored(self.targets))
    }
}

/// The delivery pumps a message wakes: usually one, so that one needs no
/// allocation of its own.
#[derive(Debug, Default)]
struct Wake {
    first: Option<Arc<Notify>>,
    more: Vec<Arc<Notify>>,
}

impl Wake {
    fn push(&mut self, n: Arc<Notify>) {
        if self.first.is_none() {
            self.first = Some(n);
        } else {
            self.more.push(n);
        }
    }

    /// Wakes each pump once.
    fn notify(&mut self) {
        for n in self.first.take().into_iter().chain(self.more.drain(..)) {
            n.notify_one();
        }
    }
}

thread_local! {
    /// Route evaluation's working memory, warmed up once per worker thread.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Routes one telemetry message and queues it to the store. Messages
/// submitted one after another are stored in that order; the returned
/// [`Pending`] tells when this one is durable.
pub async fn ingest_submit(
    state: &HubState,
    client: &ClientId,
    bag: &str,
    body: Bytes,
) -> Result<Pending, IngestError> {
    let result = route_and_submit(state, client, bag, body).await;
    if result.is_err() {
        state.stats.refused.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// The length of the topic prefix `endpoint` delivers a message from
/// `sys`'s sender on: `devices/{d}/modules/{m}/inputs/{i}/` for a module
/// input, the sender's own `devices/{d}[/modules/{m}]/messages/events/`
/// upstream.
fn delivery_prefix_len(state: &HubState, endpoint: &Endpoint, sys: &SystemProperties) -> usize {
    match endpoint {
        Endpoint::ModuleInput { module, input } => {
            "devices//modules//inputs//".len()
                + state.cfg.device_id.len()
                + module.len()
                + input.len()
        }
        Endpoint::Upstream => {
            let s = |v: &Option<String>| v.as_deref().map_or(0, str::len);
            "devices//modules//messages/events/".len()
                + s(&sys.connection_device_id)
                + s(&sys.connection_module_id)
        }
    }
}

async fn route_and_submit(
    state: &HubState,
    client: &ClientId,
    bag: &str,
    body: Bytes,
) -> Result<Pending, IngestError> {
    let msg = build_message(client, bag, body)?;
    state
        .metrics
        .received(client, msg.system.output_name.as_deref());
    let mut wake = Wake::default();
    let mut targets: Vec<Target> = Vec::new();
    let mut longest_prefix = 0;
    {
        let routes = state.routes();
        SCRATCH.with_borrow_mut(|scratch| {
            routes.set.evaluate_each(&msg, scratch, |m| {
                // Wake the endpoint's pump (module input or upstream drain).
                if matches!(
                    m.endpoint,
                    Endpoint::ModuleInput { .. } | Endpoint::Upstream
                ) {
                    wake.push(state.endpoint_notify(m.endpoint_id));
                }
                longest_prefix =
                    longest_prefix.max(delivery_prefix_len(state, m.endpoint, &msg.system));
                let t = Target::new(m.endpoint_id).priority(m.priority);
                // A route's own TTL wins; else the global one; else never expire.
                let ttl = (m.ttl_secs > 0)
                    .then_some(u64::from(m.ttl_secs))
                    .or(routes.default_ttl_secs);
                targets.push(match ttl {
                    Some(ttl) => t.ttl_secs(ttl),
                    None => t,
                });
            });
        });
    }
    if targets.is_empty() {
        state.stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
        state
            .metrics
            .dropped_no_route(client, msg.system.output_name.as_deref());
        tracing::debug!(client = %client, "message matched no route; dropped");
        return Ok(Pending {
            receipt: None,
            wake,
            targets: 0,
        });
    }
    // Every delivery re-encodes the bag, percent-encoding what the client
    // may have sent raw (`:` → `%3A`); a topic past MQTT's limit could never
    // be sent, and the stored message would block its queue. The bag as
    // stamped here is the longest any delivery uses (deliveries only drop
    // properties: `$.on` to inputs, `$.cdid`/`$.cmid` upstream).
    let len = longest_prefix + encoded_bag_len(&msg.system, &msg.properties);
    if len > MAX_TOPIC_LEN {
        tracing::warn!(client = %client, len, "message refused: its delivery topic would exceed the MQTT limit");
        return Err(IngestError::TopicTooLong {
            len,
            limit: MAX_TOPIC_LEN,
        });
    }
    let n = targets.len();
    let receipt = match state.store.append_submit(&msg, targets).await {
        Ok(r) => r,
        Err(e) => {
            state
                .metrics
                .unack_storage_failure(client, msg.system.output_name.as_deref());
            return Err(e.into());
        }
    };
    Ok(Pending {
        receipt: Some(receipt),
        wake,
        targets: n,
    })
}

/// Routes and stores one telemetry message. Returns once it is durable.
pub async fn ingest(
    state: &HubState,
    client: &ClientId,
    bag: &str,
    body: Bytes,
) -> Result<Ingested, IngestError> {
    ingest_submit(state, client, bag, body)
        .await?
        .wait(state)
        .await
}
