//! Router glue: turns a telemetry publish into a stamped [`Message`], routes
//! it with `verge-route` and stores it with `verge-store` for every endpoint.

use bytes::Bytes;
use verge_core::ClientId;
use verge_core::message::{Message, MessageKind, decode_bag};
use verge_core::time::Timestamp;
use verge_route::Endpoint;
use verge_store::Target;

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
        system.message_id = Some(uuid::Uuid::new_v4().to_string());
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

/// Routes and stores one telemetry message. Returns once it is durable.
pub async fn ingest(
    state: &HubState,
    client: &ClientId,
    bag: &str,
    body: Bytes,
) -> Result<Ingested, IngestError> {
    let msg = build_message(client, bag, body)?;
    let (targets, inputs): (Vec<Target>, Vec<String>) = {
        let routes = state.routes();
        let matches = routes.set.route(&msg);
        let mut inputs = Vec::new();
        let targets = matches
            .iter()
            .map(|m| {
                let id = m.endpoint.id();
                if matches!(m.endpoint, Endpoint::ModuleInput { .. }) {
                    inputs.push(id.clone());
                }
                let t = Target::new(id).priority(m.priority);
                // A route's own TTL wins; else the global one; else never expire.
                let ttl = (m.ttl_secs > 0)
                    .then_some(u64::from(m.ttl_secs))
                    .or(routes.default_ttl_secs);
                match ttl {
                    Some(ttl) => t.ttl_secs(ttl),
                    None => t,
                }
            })
            .collect();
        (targets, inputs)
    };
    if targets.is_empty() {
        state
            .stats
            .dropped_no_route
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(client = %client, "message matched no route; dropped");
        return Ok(Ingested::Dropped);
    }
    state.store.append(&msg, &targets).await?;
    state
        .stats
        .stored
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for ep in inputs {
        state.endpoint_notify(&ep).notify_one();
    }
    Ok(Ingested::Stored(targets.len()))
}
