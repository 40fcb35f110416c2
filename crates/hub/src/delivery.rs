//! One delivery task per module-input endpoint: waits until the target module
//! is connected and subscribed to its inputs, publishes stored messages in
//! order (QoS 1), and checkpoints the store after the module's PUBACKs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use verge_core::message::encode_bag;
use verge_store::StoredMessage;

use crate::HubState;
use crate::session::Outbound;

/// Messages read from the store per batch.
const BATCH: usize = 32;
/// How long a module may take to PUBACK before the batch is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// The MQTT topic a stored message is delivered on.
pub fn input_topic(device: &str, module: &str, input: &str, m: &StoredMessage) -> String {
    let mut sys = m.message.system.clone();
    sys.output_name = None;
    sys.input_name = Some(input.to_owned());
    // Hub-internal stamps that mean nothing to the receiver.
    sys.enqueued_time = None;
    let bag = encode_bag(&sys, &m.message.properties);
    format!("devices/{device}/modules/{module}/inputs/{input}/{bag}")
}

/// Runs the pump of endpoint `modules/{module}/inputs/{input}` forever.
pub async fn run(state: Arc<HubState>, module: String, input: String) {
    let endpoint = format!("modules/{module}/inputs/{input}");
    let device = state.cfg.device_id.clone();
    let client_id = format!("{device}/{module}");
    let probe = format!("devices/{device}/modules/{module}/inputs/{input}/");
    let notify = state.endpoint_notify(&endpoint);
    let mut changed = state.sessions.watch();
    loop {
        let Some(conn) = state.sessions.deliverable(&client_id, &probe) else {
            let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
            continue;
        };
        let batch = match state.store.read(&endpoint, BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "store read failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(last) = batch.last() else {
            tokio::select! {
                _ = notify.notified() => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let (priority, up_to) = (last.priority, last.offset);
        let mut acks = Vec::with_capacity(batch.len());
        let mut sent_all = true;
        for m in &batch {
            let (tx, rx) = oneshot::channel();
            let out = Outbound {
                topic: input_topic(&device, &module, &input, m),
                payload: m.message.body.clone(),
                ack: Some(tx),
            };
            if conn.tx.send(out).await.is_err() {
                sent_all = false;
                break;
            }
            acks.push(rx);
        }
        let mut acked_all = sent_all;
        let mut acked_upto = None;
        for (rx, m) in acks.into_iter().zip(&batch) {
            match tokio::time::timeout(ACK_TIMEOUT, rx).await {
                Ok(Ok(())) => acked_upto = Some(m.offset),
                _ => {
                    acked_all = false;
                    break;
                }
            }
        }
        if !acked_all {
            tracing::info!(%endpoint, "delivery interrupted; will resend from the checkpoint");
            if let Some(done) = acked_upto
                && let Err(e) = state.store.ack(&endpoint, priority, done).await
            {
                tracing::error!(%endpoint, error = %e, "store checkpoint failed");
            }
            state.store.rewind(&endpoint);
            continue;
        }
        if let Err(e) = state.store.ack(&endpoint, priority, up_to).await {
            tracing::error!(%endpoint, error = %e, "store checkpoint failed");
            state.store.rewind(&endpoint);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        state
            .stats
            .delivered
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}
