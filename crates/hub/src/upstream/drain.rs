//! The upstream drain: reads `$upstream` from the store and hands each
//! message to its sender's link, in order per sender; holds back the
//! messages of senders that cannot send (bounded read-ahead) while the
//! others pass; checkpoints the settled prefix of each store queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use verge_core::ClientId;
use verge_core::time::Timestamp;
use verge_store::StoredMessage;

use super::link::run_link;
use super::{
    Ack, ENDPOINT, IDLE_POLL, Link, LinkState, MAX_HELD, MAX_HELD_BYTES, MAX_OUTBOUND_PACKET,
    PIPELINE_BATCHES, PIPELINE_BYTES, REPORT_COUNTS_EVERY, Request, Sent, Settled, Shared, sender,
    upstream_topic,
};
use crate::HubState;

/// Runs the drain (and through it every link) until the hub stops.
pub(super) async fn run(shared: Arc<Shared>, state: Arc<HubState>, edge: ClientId) {
    let (settled_tx, settled_rx) = mpsc::unbounded_channel();
    let window = shared.up.cfg.batch_size.max(1) * PIPELINE_BATCHES;
    let mut drain = Drain {
        links: HashMap::new(),
        tasks: JoinSet::new(),
        no_credentials: HashSet::new(),
        edge: edge.clone(),
        senders: HashMap::new(),
        queues: BTreeMap::new(),
        inflight: HashMap::new(),
        inflight_bytes: 0,
        next_token: 0,
        settled_tx,
        held: 0,
        held_bytes: 0,
        expired_held: 0,
        window,
        reported: BTreeMap::new(),
        reported_at: None,
        shared,
    };
    // The edge device's link: the overall connectivity probe.
    drain.link(&state, &edge);
    drain.run(state, settled_rx).await;
}

/// One sender's place in the drain (room for per-sender budgets later).
#[derive(Default)]
struct SenderQueue {
    /// Read but not sent — its link is refused or down, or an earlier
    /// message of it failed — in (priority, offset) order.
    /// Boxed: a stored message is about half a KiB before its body.
    held: BTreeMap<(u32, u64), Box<StoredMessage>>,
    /// Requests in flight, all of link epoch `epoch`.
    inflight: usize,
    epoch: u64,
    /// A request of this link epoch failed: nothing more of this sender
    /// goes out on it (a later one could overtake the resend).
    failed_epoch: Option<u64>,
    /// Messages the cloud acknowledged.
    sent: u64,
}

/// A request on a link, by token.
struct InFlight {
    id: ClientId,
    msg: Box<StoredMessage>,
    epoch: u64,
    /// Safety net: every request settles by PUBACK or by its link failing.
    deadline: Instant,
}

/// What the drain has read of one store queue and not settled.
#[derive(Default)]
struct QueueProgress {
    /// One past the highest offset read.
    frontier: u64,
    /// Offsets read and not settled (in flight or held): the checkpoint
    /// stays below the first. Everything else below `frontier` is settled
    /// (acknowledged, dropped, or skipped by the store as expired).
    open: BTreeSet<u64>,
    /// The last offset handed to the checkpoint task.
    checkpointed: Option<u64>,
}

impl QueueProgress {
    /// The offset up to which every message of the queue is settled.
    fn settled_up_to(&self) -> Option<u64> {
        match self.open.first() {
            Some(&first) => first.checked_sub(1),
            None => self.frontier.checked_sub(1),
        }
    }
}

struct Drain {
    shared: Arc<Shared>,
    links: HashMap<ClientId, Link>,
    /// Link tasks; dropped (so aborted) with the drain when the hub stops.
    tasks: JoinSet<()>,
    /// Identities without credentials, warned about once.
    no_credentials: HashSet<ClientId>,
    /// The edge device itself.
    edge: ClientId,
    senders: HashMap<ClientId, SenderQueue>,
    /// By priority.
    queues: BTreeMap<u32, QueueProgress>,
    inflight: HashMap<u64, InFlight>,
    inflight_bytes: usize,
    next_token: u64,
    settled_tx: mpsc::UnboundedSender<Settled>,
    /// Messages held back, and their body bytes.
    held: usize,
    held_bytes: usize,
    /// Held messages whose TTL ran out here (the store never saw them expire).
    expired_held: u64,
    /// Requests in flight at most (the pipeline).
    window: usize,
    /// What `upstream.senders` in the `$edgeHub` twin last showed.
    reported: BTreeMap<String, Value>,
    reported_at: Option<Instant>,
}

impl Drain {
    /// The link of `id`, started on first use; `None` without credentials.
    fn link(&mut self, state: &Arc<HubState>, id: &ClientId) -> Option<&Link> {
        if !self.links.contains_key(id) {
            let (signer, key) = credential(state, id, &self.edge)?;
            // Twice the window: a full batch read at the window's edge fits.
            let (tx, rx) = mpsc::channel(self.window * 2);
            let (state_tx, link_state) = watch::channel(LinkState::Down("connecting".into()));
            self.tasks.spawn(run_link(
                self.shared.clone(),
                state.clone(),
                id.clone(),
                signer,
                key,
                rx,
                state_tx,
            ));
            self.links.insert(
                id.clone(),
                Link {
                    tx,
                    state: link_state,
                },
            );
            // A new link task numbers its epochs from 0 again.
            if let Some(s) = self.senders.get_mut(id) {
                s.failed_epoch = None;
            }
        }
        self.links.get(id)
    }

    /// Opens the link of every configured module and downstream device
    /// that has a local session (connected, or persistent subscriptions) or
    /// reported patches waiting: it may never send telemetry, but it must
    /// receive its desired patches, methods and C2D messages.
    fn ensure_links(&mut self, state: &Arc<HubState>) {
        // Every identity the hub holds keys for right now (config, verged's
        // module identities, the cloud's device scope): the table changes
        // while the hub runs, so it is read each time.
        let mut ids: Vec<ClientId> = state.sas.keys().keys().cloned().collect();
        ids.extend(
            state
                .sas
                .x509_devices()
                .iter()
                .filter(|(_, x)| x.enabled)
                .map(|(id, _)| id.clone()),
        );
        for id in ids {
            if id == self.edge || self.links.contains_key(&id) {
                continue;
            }
            let name = id.to_string();
            if state.sessions.is_connected(&name)
                || !state.sessions.subscriptions(&name).is_empty()
                || state.twins.has_pending_reported(&name)
            {
                self.link(state, &id);
            }
        }
    }

    fn edge_online(&self) -> bool {
        self.links
            .get(&self.edge)
            .is_some_and(|l| matches!(*l.state.borrow(), LinkState::Up(_)))
    }

    /// Room to read more: the pipeline and the read-ahead have space.
    fn room(&self) -> bool {
        self.inflight.len() < self.window
            && self.inflight_bytes < PIPELINE_BYTES
            && !self.read_ahead_full()
    }

    fn read_ahead_full(&self) -> bool {
        self.held >= MAX_HELD || self.held_bytes >= MAX_HELD_BYTES
    }

    async fn run(mut self, state: Arc<HubState>, mut settled: mpsc::UnboundedReceiver<Settled>) {
        let notify = state.endpoint_notify(ENDPOINT);
        let shared = self.shared.clone();
        let batch_size = shared.up.cfg.batch_size;
        let mut sessions = state.sessions.watch();
        let mut reported = state.twins.reported_watch();
        // Set when a wait below saw a session or twin-queue change (which
        // marks it seen).
        let mut recheck = true;
        let (ckpt_tx, ckpt_rx) = mpsc::channel(PIPELINE_BATCHES * 2);
        self.tasks.spawn(checkpointer(state.clone(), ckpt_rx));
        let mut tick = tokio::time::interval(IDLE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a failed store read, read again only from then.
        let mut read_pause: Option<Instant> = None;
        let mut full = false;
        loop {
            if std::mem::take(&mut recheck)
                || sessions.has_changed().unwrap_or(false)
                || reported.has_changed().unwrap_or(false)
            {
                sessions.borrow_and_update();
                reported.borrow_and_update();
                self.ensure_links(&state);
            }
            while let Ok((token, how)) = settled.try_recv() {
                self.settle(&state, token, how);
            }
            self.flush(&state);
            for (priority, q) in &mut self.queues {
                let Some(up_to) = q.settled_up_to() else {
                    continue;
                };
                if q.checkpointed.is_some_and(|c| c >= up_to) {
                    continue;
                }
                let c = Checkpoint {
                    priority: *priority,
                    up_to,
                };
                // Never wait for the checkpoint task (its store acks are
                // fsyncs, and settlements arrive one by one): while it is
                // busy, the offset is handed over on a later turn (the tick
                // guarantees one), merged with whatever settled meanwhile.
                match ckpt_tx.try_send(c) {
                    Ok(()) => q.checkpointed = Some(up_to),
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        tracing::error!("upstream: the checkpoint task ended");
                        return;
                    }
                }
            }
            if full != self.read_ahead_full() {
                full = !full;
                self.log_read_ahead(&state, full);
            }
            // Read only while the cloud is reachable: a read while offline
            // would only fill the read-ahead.
            let room = self.room() && self.edge_online();
            if room && read_pause.is_none_or(|at| Instant::now() >= at) {
                read_pause = None;
                match state.store.read(ENDPOINT, batch_size).await {
                    Ok(batch) if !batch.is_empty() => {
                        for m in batch {
                            self.take(&state, Box::new(m));
                        }
                        self.mirror_expired(&state).await;
                        continue;
                    }
                    Ok(_) => self.mirror_expired(&state).await,
                    Err(e) => {
                        tracing::error!(error = %e, "upstream: store read failed");
                        read_pause = Some(Instant::now() + IDLE_POLL);
                    }
                }
            }
            tokio::select! {
                Some((token, how)) = settled.recv() => self.settle(&state, token, how),
                () = notify.notified(), if room => {}
                () = shared.link_up.notified() => {}
                _ = tick.tick() => self.on_tick(&state).await,
                Ok(()) = sessions.changed() => recheck = true,
                Ok(()) = reported.changed() => recheck = true,
            }
        }
    }

    /// A message just read: sent on its sender's link, or held back behind
    /// that sender's earlier messages or until its link can send.
    fn take(&mut self, state: &Arc<HubState>, m: Box<StoredMessage>) {
        let q = self.queues.entry(m.priority).or_default();
        q.frontier = q.frontier.max(m.offset + 1);
        // A message without a sender stamp (none are stored that way) goes
        // out as the edge device's.
        let id = sender(&m).unwrap_or_else(|| self.edge.clone());
        if self.link(state, &id).is_none() {
            if self.no_credentials.insert(id.clone()) {
                tracing::warn!(identity = %id, "upstream: no credentials for this sender; dropping its messages");
            }
            state
                .stats
                .upstream
                .dropped_no_identity
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(q) = self.queues.get_mut(&m.priority) {
            q.open.insert(m.offset);
        }
        let s = self.senders.entry(id.clone()).or_default();
        if !s.held.is_empty() {
            self.hold(&id, m);
        } else if let Err(m) = self.try_send(state, &id, m) {
            self.hold(&id, m);
        }
    }

    /// Sends `m` on the link of `id` if that link can take it now, keeping
    /// the sender's order; gives it back otherwise.
    fn try_send(
        &mut self,
        state: &HubState,
        id: &ClientId,
        m: Box<StoredMessage>,
    ) -> Result<(), Box<StoredMessage>> {
        if self.inflight.len() >= self.window * 2 {
            return Err(m);
        }
        let Some(link) = self.links.get(id) else {
            return Err(m);
        };
        let LinkState::Up(epoch) = *link.state.borrow() else {
            return Err(m);
        };
        let s = self.senders.entry(id.clone()).or_default();
        if s.failed_epoch == Some(epoch) || (s.inflight > 0 && s.epoch != epoch) {
            // What the lost connection took down settles first, then goes
            // out again before anything newer.
            return Err(m);
        }
        let topic = upstream_topic(id, &m);
        if let Err(why) = sendable(&topic, &m.message.body) {
            // Settled here, once: a resend would fail the same way and hold
            // back every message behind it.
            self.unsendable(state, id, &m, why);
            return Ok(());
        }
        let token = self.next_token;
        self.next_token += 1;
        let req = Request {
            topic,
            payload: m.message.body.clone(),
            epoch,
            ack: Ack {
                token,
                tx: self.settled_tx.clone(),
                done: false,
            },
        };
        match link.tx.try_send(req) {
            Ok(()) => {
                s.inflight += 1;
                s.epoch = epoch;
                self.inflight_bytes += m.message.body.len();
                let limit =
                    Duration::from_secs(self.shared.up.cfg.ack_timeout_secs.saturating_mul(2));
                self.inflight.insert(
                    token,
                    InFlight {
                        id: id.clone(),
                        msg: m,
                        epoch,
                        deadline: Instant::now() + limit,
                    },
                );
                Ok(())
            }
            // Full: the link is not taking requests; held until it does.
            Err(mpsc::error::TrySendError::Full(_)) => Err(m),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The link task is gone (it only ends by panicking): start a
                // new one next time.
                tracing::error!(identity = %id, "upstream link task ended; restarting it");
                self.links.remove(id);
                Err(m)
            }
        }
    }

    fn unsendable(&mut self, state: &HubState, id: &ClientId, m: &StoredMessage, why: &str) {
        tracing::warn!(
            identity = %id,
            message_id = m.message.system.message_id.as_deref().unwrap_or(""),
            reason = why,
            "upstream: message cannot be sent to the cloud; dropping it"
        );
        state
            .stats
            .upstream
            .dropped_unsendable
            .fetch_add(1, Ordering::Relaxed);
        self.close(m);
    }

    /// `m` is settled: the checkpoint may pass it.
    fn close(&mut self, m: &StoredMessage) {
        if let Some(q) = self.queues.get_mut(&m.priority) {
            q.open.remove(&m.offset);
        }
    }

    fn hold(&mut self, id: &ClientId, m: Box<StoredMessage>) {
        self.held += 1;
        self.held_bytes += m.message.body.len();
        self.senders
            .entry(id.clone())
            .or_default()
            .held
            .insert((m.priority, m.offset), m);
    }

    /// Sends what is held back for senders that can send again, in order.
    fn flush(&mut self, state: &HubState) {
        let ids: Vec<ClientId> = self
            .senders
            .iter()
            .filter(|(_, s)| !s.held.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            loop {
                let Some(m) = self
                    .senders
                    .get_mut(&id)
                    .and_then(|s| s.held.pop_first())
                    .map(|(_, m)| m)
                else {
                    break;
                };
                self.held -= 1;
                self.held_bytes -= m.message.body.len();
                if let Err(m) = self.try_send(state, &id, m) {
                    self.hold(&id, m);
                    break;
                }
            }
        }
    }

    /// A link settled request `token` (`None`: failed, send it again).
    fn settle(&mut self, state: &HubState, token: u64, how: Option<Sent>) {
        // Unknown: a request the link never took, or one given up on.
        let Some(f) = self.inflight.remove(&token) else {
            return;
        };
        self.inflight_bytes -= f.msg.message.body.len();
        let s = self.senders.entry(f.id.clone()).or_default();
        s.inflight = s.inflight.saturating_sub(1);
        match how {
            Some(Sent::Acked) => {
                s.sent += 1;
                state.stats.upstream.sent.fetch_add(1, Ordering::Relaxed);
                let sys = &f.msg.message.system;
                state.metrics.sent(
                    (
                        sys.connection_device_id.as_deref(),
                        sys.connection_module_id.as_deref(),
                    ),
                    sys.output_name.as_deref(),
                    "upstream",
                    "",
                    f.msg.priority,
                );
                self.close(&f.msg);
            }
            Some(Sent::Unsendable) => {
                self.unsendable(state, &f.id, &f.msg, "the link could not encode it");
            }
            None => {
                s.failed_epoch = Some(f.epoch);
                self.hold(&f.id, f.msg);
            }
        }
    }

    /// Once a second: TTL of held messages, the safety net for requests
    /// never settled, the counters, the `$edgeHub` report.
    async fn on_tick(&mut self, state: &HubState) {
        let now = Timestamp::now();
        let mut expired = Vec::new();
        for s in self.senders.values_mut() {
            s.held.retain(|_, m| {
                let keep = m.expiry.is_none_or(|at| at > now);
                if !keep {
                    expired.push((m.priority, m.offset, m.message.body.len()));
                }
                keep
            });
        }
        for (priority, offset, len) in expired {
            self.held -= 1;
            self.held_bytes -= len;
            self.expired_held += 1;
            if let Some(q) = self.queues.get_mut(&priority) {
                q.open.remove(&offset);
            }
        }
        let late: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.deadline <= Instant::now())
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            if let Some(f) = self.inflight.remove(&token) {
                tracing::warn!(identity = %f.id, "upstream: no settlement for a request in time; sending it again");
                self.inflight_bytes -= f.msg.message.body.len();
                if let Some(s) = self.senders.get_mut(&f.id) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
                self.hold(&f.id, f.msg);
            }
        }
        let stats = &state.stats.upstream;
        stats.held.store(self.held as u64, Ordering::Relaxed);
        for (id, s) in &self.senders {
            stats.set_counts(&id.to_string(), s.held.len() as u64, s.sent);
        }
        self.mirror_expired(state).await;
        self.report(state).await;
    }

    fn log_read_ahead(&self, state: &HubState, full: bool) {
        state
            .stats
            .upstream
            .read_ahead_full
            .store(full, Ordering::Relaxed);
        if !full {
            tracing::info!("upstream: read-ahead below its bound again; reading resumed");
            return;
        }
        let mut waiting: Vec<(usize, String)> = self
            .senders
            .iter()
            .filter(|(_, s)| !s.held.is_empty())
            .map(|(id, s)| (s.held.len(), id.to_string()))
            .collect();
        waiting.sort_unstable_by(|a, b| b.cmp(a));
        waiting.truncate(5);
        tracing::warn!(
            held = self.held,
            held_bytes = self.held_bytes,
            senders = ?waiting,
            "upstream: read-ahead bound reached; every sender waits until these can send or their messages expire"
        );
    }

    /// Copies the `$upstream` TTL-drop counts (store, held) into the stats.
    async fn mirror_expired(&self, state: &HubState) {
        if let Ok(queues) = state.store.queues().await {
            let n: u64 = queues
                .iter()
                .filter(|q| q.endpoint == ENDPOINT)
                .map(|q| q.expired)
                .sum();
            state
                .stats
                .upstream
                .expired
                .store(n + self.expired_held, Ordering::Relaxed);
        }
    }

    /// Writes `upstream.senders` to the `$edgeHub` twin's reported
    /// properties: a change of status at once, waiting counts at most every
    /// [`REPORT_COUNTS_EVERY`].
    async fn report(&mut self, state: &HubState) {
        let twin = state.edgehub_twin_id();
        if state.twins.pending_reported(&twin) >= crate::twins::MAX_PENDING_REPORTED / 2 {
            // Leave the queue to the hub's own status while the cloud is away.
            return;
        }
        let counts_due = self
            .reported_at
            .is_none_or(|at| at.elapsed() >= REPORT_COUNTS_EVERY);
        let mut patch = serde_json::Map::new();
        for (id, s) in state.stats.upstream.senders() {
            let key = twin_key(&id);
            let entry = serde_json::json!({
                "status": s.status,
                "reason": s.reason,
                "sinceUtc": s.since.to_iso8601(),
                "waiting": s.waiting,
            });
            let Some(old) = self.reported.get(&key) else {
                patch.insert(key, entry);
                continue;
            };
            let changed = old.get("status") != entry.get("status")
                || old.get("reason") != entry.get("reason")
                || (counts_due && old.get("waiting") != entry.get("waiting"));
            if changed {
                patch.insert(key, entry);
            }
        }
        if patch.is_empty() {
            return;
        }
        let body = serde_json::json!({ "upstream": { "senders": Value::Object(patch.clone()) } });
        match state.twins.patch_reported(&twin, &body).await {
            Ok(_) => {
                self.reported.extend(patch);
                self.reported_at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot report upstream senders on the $edgeHub twin");
            }
        }
    }
}

/// A twin property name for identity `id`: IoT Hub refuses `.`, `$` and
/// spaces in names, which device and module ids may hold, so those (and
/// `%`) are percent-encoded.
fn twin_key(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            '$' => out.push_str("%24"),
            ' ' => out.push_str("%20"),
            c => out.push(c),
        }
    }
    out
}

/// A settled prefix of a store queue, for the checkpoint task.
struct Checkpoint {
    priority: u32,
    up_to: u64,
}

/// Checkpoints the store behind the drain, so the drain does not wait for
/// the checkpoint's fsync: checkpoints waiting here are merged into one
/// (the latest offset per queue) and one group commit. A checkpoint that is
/// lost (crash) or fails only means a resend after a restart
/// (at-least-once); the next one covers a failed one.
async fn checkpointer(state: Arc<HubState>, mut rx: mpsc::Receiver<Checkpoint>) {
    while let Some(first) = rx.recv().await {
        let mut up_to: BTreeMap<u32, u64> = BTreeMap::new();
        let mut add = |c: Checkpoint| {
            let e = up_to.entry(c.priority).or_default();
            *e = (*e).max(c.up_to);
        };
        add(first);
        while let Ok(c) = rx.try_recv() {
            add(c);
        }
        for (priority, offset) in up_to {
            if let Err(e) = state.store.ack(ENDPOINT, priority, offset).await {
                tracing::error!(error = %e, "upstream: store checkpoint failed");
            }
        }
    }
}

/// Why `topic` and `payload` cannot go out as one MQTT PUBLISH, if so.
fn sendable(topic: &str, payload: &[u8]) -> Result<(), &'static str> {
    if topic.len() > usize::from(u16::MAX) {
        return Err("its topic with the property bag exceeds MQTT's 65,535 bytes");
    }
    // Topic length prefix, packet id and a 5-byte fixed header.
    if topic.len() + payload.len() + 9 > MAX_OUTBOUND_PACKET {
        return Err("the packet exceeds the largest the upstream sends");
    }
    Ok(())
}

/// Who a link signs its CONNECT token as, and with which key: the identity
/// itself when the hub holds its key; for an X.509 leaf (no key to sign
/// with) the hub's own identity `edge`, on behalf of the leaf — the cloud
/// accepts that for a device in the edge's scope (verge-cloud's device
/// endpoint; edgeHub does the same upstream). `None`: no credentials.
fn credential(
    state: &HubState,
    id: &ClientId,
    edge: &ClientId,
) -> Option<(ClientId, verge_core::SharedAccessKey)> {
    if let Some(key) = state.sas.key_for(id) {
        return Some((id.clone(), key));
    }
    let x509 = state.sas.x509_devices();
    if id.module.is_none() && x509.get(id).is_some_and(|x| x.enabled) {
        return Some((edge.clone(), state.sas.key_for(edge)?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_stops_before_the_first_unsettled_offset() {
        let mut q = QueueProgress::default();
        assert_eq!(q.settled_up_to(), None, "nothing read");
        // Read 10..=14 (0..10 were settled before, or skipped as expired).
        q.frontier = 15;
        q.open.extend([11, 13]);
        assert_eq!(q.settled_up_to(), Some(10));
        q.open.remove(&11);
        assert_eq!(q.settled_up_to(), Some(12));
        q.open.remove(&13);
        assert_eq!(q.settled_up_to(), Some(14));
        q.open.insert(0);
        assert_eq!(q.settled_up_to(), None, "the first offset is open");
    }

    #[test]
    fn sender_keys_are_valid_twin_property_names() {
        assert_eq!(twin_key("edge1/modA"), "edge1/modA");
        assert_eq!(twin_key("edge1/$edgeHub"), "edge1/%24edgeHub");
        assert_eq!(twin_key("a.b c%"), "a%2Eb%20c%25");
    }

    #[test]
    fn oversized_topics_are_not_sendable() {
        assert!(sendable(&"a".repeat(65_535), b"x").is_ok());
        assert!(sendable(&"a".repeat(65_536), b"x").is_err());
        assert!(sendable("t", &vec![0u8; MAX_OUTBOUND_PACKET]).is_err());
    }
}
