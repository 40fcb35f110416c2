//! One delivery task per module-input endpoint: waits until the target module
//! is connected and subscribed to its inputs, publishes stored messages in
//! order (QoS 1) with a sliding window of unacknowledged deliveries, and
//! checkpoints the store behind the module's PUBACKs.
//!
//! Checkpoints are written in the background (same task, never blocking the
//! reads): the next messages come from the store's in-memory read cursor, so
//! they need not wait for the previous checkpoint's fsync. A checkpoint lost
//! to a crash only means those messages are delivered again (at least once).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use verge_core::message::{MAX_TOPIC_LEN, encode_bag_into};
use verge_endpoint::session::ConnHandle;
use verge_store::StoredMessage;

use crate::session::Outbound;
use crate::{HubState, lock};

/// Deliveries sent and not yet acknowledged, per endpoint. Beyond the
/// connection's own inflight limit they wait in its (bounded) queue, so the
/// connection always has the next message at hand.
const WINDOW: usize = 128;
/// Most messages read from the store at once.
const READ_MAX: usize = 64;
/// How long a module may take to PUBACK before the window is resent.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Acks gathered into one checkpoint: a checkpoint alone in a group commit
/// costs an fsync that the next append would wait behind. Only redelivery
/// after a crash depends on it.
const CHECKPOINT_DELAY: Duration = Duration::from_millis(5);

/// The MQTT topic a stored message is delivered on.
pub fn input_topic(device: &str, module: &str, input: &str, m: &StoredMessage) -> String {
    topic_for(
        &format!("devices/{device}/modules/{module}/inputs/{input}/"),
        input,
        &mut m.clone(),
    )
}

/// [`input_topic`] with the `devices/{d}/modules/{m}/inputs/{i}/` prefix
/// built once per pump; restamps the message in place (it is being handed
/// over anyway) rather than cloning its properties.
fn topic_for(prefix: &str, input: &str, m: &mut StoredMessage) -> String {
    let sys = &mut m.message.system;
    sys.output_name = None;
    sys.input_name = Some(input.to_owned());
    // Hub-internal stamps that mean nothing to the receiver.
    sys.enqueued_time = None;
    // Room for a typical bag, so the topic is usually one allocation.
    let mut topic = String::with_capacity(prefix.len() + 256);
    topic.push_str(prefix);
    encode_bag_into(&mut topic, sys, &m.message.properties);
    topic
}

/// Acknowledged prefixes waiting to be checkpointed: per queue (priority),
/// the highest offset the module has acknowledged.
#[derive(Default)]
struct Checkpoints {
    due: Mutex<HashMap<u32, u64>>,
    wake: Notify,
}

impl Checkpoints {
    fn done(&self, priority: u32, offset: u64) {
        let mut due = lock(&self.due);
        let e = due.entry(priority).or_insert(offset);
        *e = (*e).max(offset);
        drop(due);
        self.wake.notify_one();
    }

    /// Writes due checkpoints, one store ack per queue at a time; acks that
    /// pile up meanwhile are merged into the next.
    async fn run(&self, state: &HubState, endpoint: &str) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(CHECKPOINT_DELAY).await;
            let due = std::mem::take(&mut *lock(&self.due));
            for (priority, up_to) in due {
                if let Err(e) = state.store.checkpoint(endpoint, priority, up_to).await {
                    // Not checkpointed = delivered again later (at least once).
                    tracing::error!(%endpoint, error = %e, "store checkpoint failed");
                }
            }
        }
    }
}

/// A delivery awaiting the module's PUBACK.
struct InFlight {
    priority: u32,
    offset: u64,
    ack: oneshot::Receiver<()>,
    /// False for a dead-lettered message (settled without being sent).
    delivered: bool,
    /// Sender (device, module) and output, moved out of the message for
    /// `edgehub_messages_sent_total` once acknowledged.
    from: (Option<String>, Option<String>),
    output: Option<String>,
}

/// How a delivery session to one connection ended.
enum Ended {
    /// Nothing in flight and nothing to read: wait for news.
    Idle,
    /// The connection went away or stopped acknowledging: resend from the
    /// checkpoint.
    Broken,
}

/// The fixed parts of one pump.
struct Pump<'a> {
    state: &'a HubState,
    endpoint: &'a str,
    input: &'a str,
    /// The receiving client id (`device/module`).
    to: &'a str,
    prefix: &'a str,
    notify: &'a Notify,
    checkpoints: &'a Checkpoints,
}

impl Pump<'_> {
    /// Delivers to `conn` until there is nothing left to do or it fails.
    async fn deliver(&self, conn: &ConnHandle) -> Ended {
        let mut inflight: VecDeque<InFlight> = VecDeque::with_capacity(WINDOW);
        // Whether the store may hold unread messages.
        let mut more = true;
        let mut last_progress = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if more && inflight.len() < WINDOW {
                let want = (WINDOW - inflight.len()).min(READ_MAX);
                let batch = match self.state.store.read(self.endpoint, want).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(endpoint = %self.endpoint, error = %e, "store read failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        return Ended::Broken;
                    }
                };
                more = !batch.is_empty();
                if inflight.is_empty() {
                    last_progress = Instant::now();
                }
                for mut m in batch {
                    let (tx, rx) = oneshot::channel();
                    // Before the restamp, which clears it.
                    let output = m.message.system.output_name.take();
                    let topic = topic_for(self.prefix, self.input, &mut m);
                    // The topic holds them now; only the body is sent.
                    let from = (
                        m.message.system.connection_device_id.take(),
                        m.message.system.connection_module_id.take(),
                    );
                    if topic.len() > MAX_TOPIC_LEN {
                        // Stored before ingest refused such messages: it can
                        // never be sent (the connection would drop on every
                        // try and the module never get its inputs again).
                        // Settled as if acknowledged, so it is checkpointed
                        // past in order, after the deliveries before it.
                        tracing::warn!(
                            endpoint = %self.endpoint,
                            offset = m.offset,
                            message_id = m.message.system.message_id.as_deref().unwrap_or(""),
                            len = topic.len(),
                            "stored message dead-lettered: its topic exceeds the MQTT limit"
                        );
                        self.state
                            .stats
                            .dead_lettered
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = tx.send(());
                        inflight.push_back(InFlight {
                            priority: m.priority,
                            offset: m.offset,
                            ack: rx,
                            delivered: false,
                            from,
                            output,
                        });
                        continue;
                    }
                    let out = Outbound {
                        topic,
                        payload: m.message.body,
                        ack: Some(tx),
                    };
                    if conn.tx.send(out).await.is_err() {
                        return Ended::Broken;
                    }
                    inflight.push_back(InFlight {
                        priority: m.priority,
                        offset: m.offset,
                        ack: rx,
                        delivered: true,
                        from,
                        output,
                    });
                }
            }
            // Settle what is already acknowledged without waiting.
            while let Some(front) = inflight.front_mut() {
                match front.ack.try_recv() {
                    Ok(()) => {
                        self.acked(&mut inflight);
                        last_progress = Instant::now();
                    }
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => return Ended::Broken,
                }
            }
            if more && inflight.len() < WINDOW {
                continue;
            }
            if inflight.is_empty() {
                return Ended::Idle;
            }
            let room = inflight.len() < WINDOW;
            tokio::select! {
                r = async {
                    match inflight.front_mut() {
                        Some(f) => (&mut f.ack).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_err() {
                        return Ended::Broken;
                    }
                    self.acked(&mut inflight);
                    last_progress = Instant::now();
                }
                () = self.notify.notified(), if room => more = true,
                _ = tick.tick() => {
                    if last_progress.elapsed() > ACK_TIMEOUT {
                        tracing::info!(endpoint = %self.endpoint, "no PUBACK in time");
                        return Ended::Broken;
                    }
                }
            }
        }
    }

    /// The front delivery was acknowledged.
    fn acked(&self, inflight: &mut VecDeque<InFlight>) {
        if let Some(f) = inflight.pop_front() {
            self.checkpoints.done(f.priority, f.offset);
            if f.delivered {
                self.state
                    .stats
                    .delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.state.metrics.sent(
                    (f.from.0.as_deref(), f.from.1.as_deref()),
                    f.output.as_deref(),
                    self.to,
                    self.input,
                    f.priority,
                );
            }
        }
    }
}

/// Runs the pump of endpoint `modules/{module}/inputs/{input}` forever.
pub async fn run(state: Arc<HubState>, module: String, input: String) {
    let endpoint = format!("modules/{module}/inputs/{input}");
    let device = state.cfg.device_id.clone();
    let client_id = format!("{device}/{module}");
    let prefix = format!("devices/{device}/modules/{module}/inputs/{input}/");
    let notify = state.endpoint_notify(&endpoint);
    let checkpoints = Checkpoints::default();
    let pump = Pump {
        state: &state,
        endpoint: &endpoint,
        input: &input,
        to: &client_id,
        prefix: &prefix,
        notify: &notify,
        checkpoints: &checkpoints,
    };
    let mut changed = state.sessions.watch();
    let deliver = async {
        loop {
            let Some(conn) = state.sessions.deliverable(&client_id, &prefix) else {
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
                continue;
            };
            match pump.deliver(&conn).await {
                Ended::Idle => {
                    tokio::select! {
                        () = notify.notified() => {}
                        _ = changed.changed() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Ended::Broken => {
                    tracing::info!(%endpoint, "delivery interrupted; will resend from the checkpoint");
                    state.store.rewind(&endpoint);
                    // A connection that just died may still be attached for
                    // a moment; do not spin on it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    // One task: aborting the pump also stops its checkpoints (nothing is
    // lost: unacknowledged = delivered again).
    tokio::join!(deliver, checkpoints.run(&state, &endpoint));
}
