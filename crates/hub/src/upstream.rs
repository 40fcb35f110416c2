//! The hub's upstream: drains the `$upstream` store queues to the cloud IoT
//! hub (Azure IoT Hub or verge-cloud; both speak the same MQTT dialect).
//!
//! # Design
//!
//! * **One MQTT 3.1.1/TLS connection per sending identity** (a [`Link`]): the
//!   edge device itself, each module `{d}/{m}` and each downstream device, so
//!   the cloud sees every sender as itself (as edgeHub does). Client id = the
//!   identity, username `{iothub_hostname}/{id}/?api-version=2021-04-12`,
//!   password = a SAS token signed with the identity's key: the device key,
//!   module keys derived from it, and downstream devices' keys from the
//!   configuration's `[devices]` table. The hub holds every key it
//!   authenticates with, so it never needs to cache a token a device
//!   presented (edgeHub does, because it may only hold tokens).
//! * The edge device's link is always kept up: it is the connectivity probe
//!   and its state is the overall one ([`UpstreamStats::online`]). Other links
//!   are opened when their identity first has something to send, or has a
//!   local session (connected, or persistent subscriptions) or reported
//!   patches waiting — a module that never sends still receives — and kept.
//! * **Everything else an identity does with the cloud rides its link.** On
//!   every connection (clean session) the link subscribes to twin
//!   responses, desired patches and methods (and, for a downstream device,
//!   `devices/{d}/messages/devicebound/#`), then GETs the twin:
//!   - *Desired*: the cloud's twin replaces the cached one and the client,
//!     if subscribed, gets one synthesised patch with what changed or was
//!     removed since the version the hub had (edgeHub's behaviour after a
//!     reconnect). Live patches are applied in `$version` order and pushed;
//!     a gap in versions triggers another GET. Every linked identity is
//!     subscribed, whether or not its client listens right now: the cached
//!     twin then stays current for GETs served offline, and the cost is one
//!     filter on a link that exists anyway (for methods).
//!   - *Reported*: patches the hub answered 204 locally wait, durably and in
//!     order, in the twins' queue ([`crate::twins`]); after the GET the link
//!     sends them one at a time (`$iothub/twin/PATCH/properties/reported/`)
//!     and drops each on the cloud's answer (2xx, or a 4xx that a resend
//!     would only repeat; 429/5xx are retried after a pause).
//!   - *Methods*: `$iothub/methods/POST/{name}` is relayed to the local
//!     client with the HTTP API's machinery ([`methods::relay`]) and its
//!     answer returned on `$iothub/methods/res/{status}`; a client not
//!     connected (or not subscribed) is answered 404 at once, no answer in
//!     [`METHOD_TIMEOUT`] 504. At most [`MAX_RELAYS`] at once (then 429).
//!   - *C2D* (downstream devices): relayed live, not stored; the PUBACK to
//!     the cloud (= complete) is sent only after the device's own PUBACK,
//!     on the same connection. A device not connected here gets no PUBACK:
//!     the message stays locked until the link's connection ends, then the
//!     cloud redelivers it or gives up, by its rules.
//! * A link that is down tries again every `reconnect_ms` (≤ 5 s, measured
//!   from the start of the previous attempt; each attempt is bounded by
//!   [`HANDSHAKE_TIMEOUT`]). Connecting wakes the drain, so a backlog starts
//!   moving as soon as the link is back. Transitions are logged once, not
//!   every attempt. A dead link is found by keep-alive (PINGREQ every
//!   keep_alive/2, no PINGRESP by the next one = down) or by a PUBACK that
//!   does not come within `ack_timeout_secs`.
//! * A CONNECT the cloud *refuses* (not authorized, bad username or
//!   password, unknown client id: the identity does not exist there, or its
//!   key is wrong) is not a network failure: the link retries with back-off
//!   (doubling up to [`REFUSED_BACKOFF_MAX`]), logs the refusal once, and
//!   shows `refused` in [`UpstreamStats::senders`] and in the `$edgeHub`
//!   reported properties (`upstream.senders`); only its own messages wait.
//! * **Drain: per-sender progress.** One task reads batches (`batch_size`)
//!   from the store (highest priority queue first, FIFO) and publishes each
//!   message QoS 1 on its sender's link, in order per sender, up to
//!   [`PIPELINE_BATCHES`] × `batch_size` requests (and [`PIPELINE_BYTES`])
//!   in flight across all links. A message whose sender cannot send right
//!   now (link refused or down, or an earlier message of it failed) is
//!   *held back* in memory, and so is every later one of that sender, while
//!   the other senders' messages pass it; held messages go out in order once
//!   the link is up again, or expire by their TTL (counted). The store's
//!   checkpoint is a prefix, so the drain checkpoints (in a task of its own,
//!   so it never waits for that fsync) only up to the first message read and
//!   not settled (acknowledged, dropped): a dropped link or a kill -9 means
//!   redelivery — of the held messages and of what others sent past them —
//!   never loss. The read-ahead is bounded ([`MAX_HELD`] messages,
//!   [`MAX_HELD_BYTES`]): at the bound the drain reads nothing further, logs
//!   it once with the senders holding it, and sets
//!   [`UpstreamStats::read_ahead_full`], until they can send or expire.
//! * **Link epochs.** A link's epoch changes each time it loses its
//!   connection; every request carries the link's epoch when the drain sent
//!   it, and a link sends only requests of its current epoch. A request of a
//!   lost connection fails back to the drain, which sends nothing more of
//!   that sender until all of its requests of that epoch are settled, then
//!   resends the failed ones first: a later message never overtakes the
//!   resend of an earlier one.
//! * Our own MQTT client on `rumqttc`'s packet codec rather than its
//!   `EventLoop`: the event loop keeps and replays unacknowledged publishes
//!   itself across reconnects, while here the store is the single source of
//!   truth — a lost connection simply fails what was in flight. (verge-sdk's
//!   engine is built on that event loop and depends on verge-daemon.)
//! * A message that cannot go out as an MQTT PUBLISH at all (its topic
//!   with the property bag past 65,535 bytes, or too large a packet) is
//!   settled, not retried: dropped, counted
//!   ([`UpstreamStats::dropped_unsendable`]) and logged once with its sender
//!   and message id; the checkpoint moves past it.
//! * Expired messages are skipped by the store's reads; the `$upstream`
//!   queues' expired counts are mirrored into [`UpstreamStats::expired`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use verge_core::message::encode_bag;
use verge_core::time::Timestamp;
use verge_core::{ClientId, DeviceId, ModuleId, SasToken, SharedAccessKey};
use verge_store::StoredMessage;

use crate::config::{Config, UpstreamConfig};
use crate::session::Outbound;
use crate::twins::CloudPatch;
use crate::{HubState, lock, methods, topic};

/// The store endpoint drained here.
pub const ENDPOINT: &str = "$upstream";
/// The `api-version` sent in the MQTT username.
pub const API_VERSION: &str = "2021-04-12";
/// Longest a connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime of the SAS tokens the links sign; a link reconnects with a fresh
/// token [`RENEW_MARGIN_SECS`] before expiry (IoT Hub drops it at expiry).
const TOKEN_TTL_SECS: u64 = 3600;
const RENEW_MARGIN_SECS: u64 = 300;
/// Largest packet accepted from the cloud (a C2D message or method call is
/// at most 256 KiB, a twin 32 KiB per section).
const MAX_INBOUND_PACKET: usize = 1 << 20;
/// Largest packet sent to the cloud (a 256 KiB message plus its topic).
const MAX_OUTBOUND_PACKET: usize = verge_core::message::MAX_MESSAGE_SIZE + 64 * 1024;
/// Publishes are coalesced into one write up to about this many bytes.
const WRITE_BURST_BYTES: usize = 64 * 1024;
/// Method calls and C2D messages relayed at once per link; beyond, method
/// calls are answered 429 (bounded: each holds a task until answered).
const MAX_RELAYS: usize = 64;
/// Longest a cloud method call waits for the local target (IoT Hub's
/// maximum response timeout; the cloud's caller usually gives up sooner).
const METHOD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a relayed C2D message waits for the device's PUBACK before it
/// is left to the cloud (which abandons locks after about a minute).
const C2D_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before a reported patch the cloud deferred (429/5xx) is sent again.
const REPORTED_RETRY: Duration = Duration::from_secs(1);
/// How long the drain sleeps when it was not woken (safety net).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Batches the drain keeps in flight: while the cloud fsyncs and
/// acknowledges one, the next is already on the wire.
const PIPELINE_BATCHES: usize = 4;
/// ...and at most about this many payload bytes in flight (batches of large
/// messages are not multiplied).
const PIPELINE_BYTES: usize = 4 << 20;
/// Most messages read ahead and held back in memory for senders that cannot
/// send right now, so the others' pass them; at the bound the drain reads no
/// further (and says so) until they can send or their messages expire.
pub const MAX_HELD: usize = 10_000;
/// ...and at most this many body bytes.
pub const MAX_HELD_BYTES: usize = 32 << 20;
/// Longest pause between CONNECT attempts of an identity the cloud refused.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often changed waiting counts are written to `upstream.senders` in
/// the `$edgeHub` reported properties (a status change is written at once).
const REPORT_COUNTS_EVERY: Duration = Duration::from_secs(30);

/// Upstream counters and link states (part of the hub's [`crate::Stats`]).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Messages the cloud acknowledged.
    pub sent: AtomicU64,
    /// `$upstream` messages dropped because their TTL ran out first (in the
    /// store, or while held back for a sender that could not send).
    pub expired: AtomicU64,
    /// Messages dropped because the hub holds no credentials for their
    /// sender any more (e.g. a module removed from the configuration).
    pub dropped_no_identity: AtomicU64,
    /// Messages dropped because they cannot be sent upstream at all (e.g.
    /// their topic with the property bag exceeds MQTT's 65,535 bytes).
    pub dropped_unsendable: AtomicU64,
    /// Messages read ahead and held back in memory because their sender
    /// cannot send right now (refused by the cloud, or its link down) while
    /// other senders' messages pass them.
    pub held: AtomicU64,
    /// The read-ahead is at its bound ([`MAX_HELD`] messages or
    /// [`MAX_HELD_BYTES`]): the drain reads nothing more, so every sender
    /// waits, until the held-back senders can send or their messages expire.
    pub read_ahead_full: AtomicBool,
    /// The overall link state: the edge device's own link is up.
    pub online: AtomicBool,
    senders: Mutex<BTreeMap<String, SenderStatus>>,
}

/// One upstream sender (an identity with a link), as reported in the
/// `$edgeHub` twin's `upstream.senders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderStatus {
    /// `connected`, `disconnected` or `refused` (the cloud refused the
    /// identity's CONNECT: unknown identity, bad credentials).
    pub status: &'static str,
    /// Why it is not connected: the cloud's CONNACK code or the network error.
    pub reason: Option<String>,
    /// When it entered this status.
    pub since: Timestamp,
    /// Its messages read ahead and waiting in memory.
    pub waiting: u64,
    /// Its messages the cloud acknowledged since the hub started.
    pub sent: u64,
}

impl UpstreamStats {
    /// Each identity's link state (true = connected), by identity.
    pub fn links(&self) -> BTreeMap<String, bool> {
        lock(&self.senders)
            .iter()
            .map(|(id, s)| (id.clone(), s.status == "connected"))
            .collect()
    }

    /// Each sender's state and counters, by identity.
    pub fn senders(&self) -> BTreeMap<String, SenderStatus> {
        lock(&self.senders).clone()
    }

    fn set_link(&self, id: &str, state: &LinkState) {
        let (status, reason) = match state {
            LinkState::Up(_) => ("connected", None),
            LinkState::Down(why) => ("disconnected", Some(why.clone())),
            LinkState::Refused(why) => ("refused", Some(why.clone())),
        };
        let mut senders = lock(&self.senders);
        let s = senders
            .entry(id.to_owned())
            .or_insert_with(|| SenderStatus {
                status,
                reason: None,
                since: Timestamp::now(),
                waiting: 0,
                sent: 0,
            });
        if s.status != status {
            s.since = Timestamp::now();
        }
        s.status = status;
        s.reason = reason;
    }

    fn set_counts(&self, id: &str, waiting: u64, sent: u64) {
        if let Some(s) = lock(&self.senders).get_mut(id) {
            s.waiting = waiting;
            s.sent = sent;
        }
    }
}

/// What the upstream needs that is fixed for the hub's lifetime.
pub struct Upstream {
    cfg: UpstreamConfig,
    hub_host: String,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl Upstream {
    /// Validates the `[upstream]` table (reads the CA file); `None` when the
    /// configuration has none. Called before the hub starts, so a bad CA file
    /// is a configuration error rather than a silent offline hub.
    pub fn prepare(cfg: &Config) -> anyhow::Result<Option<Self>> {
        let Some(up) = &cfg.upstream else {
            return Ok(None);
        };
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&up.ca_file)
            .with_context(|| format!("upstream.ca_file: reading {}", up.ca_file.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("upstream.ca_file: parsing {}", up.ca_file.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            anyhow::bail!(
                "upstream.ca_file: {} holds no usable CA certificate",
                up.ca_file.display()
            );
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(up.hostname.clone())
            .map_err(|e| anyhow::anyhow!("upstream.hostname {:?}: {e}", up.hostname))?;
        Ok(Some(Self {
            cfg: up.clone(),
            hub_host: cfg.iothub_hostname.clone(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_name,
        }))
    }

    /// Runs the upstream (links and drain) until the hub stops.
    pub async fn run(self, state: Arc<HubState>) {
        let shared = Arc::new(Shared {
            up: self,
            link_up: Notify::new(),
        });
        // Config validation guarantees a valid device id.
        let device = match DeviceId::new(state.cfg.device_id.as_str()) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "device_id is invalid; no upstream");
                return;
            }
        };
        let edge = edge_identity(&state, device);
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
}

struct Shared {
    up: Upstream,
    /// Woken whenever a link connects (one waiter: the drain). `notify_one`
    /// keeps a permit, so a link coming up between the drain's failure and
    /// its wait is not missed.
    link_up: Notify,
}

/// A publish handed to a link; `ack` settles it: on the cloud's PUBACK, as
/// unsendable when it cannot be encoded at all, or — dropped unsettled — as
/// failed when the link goes down first or the request is of an older link
/// epoch (then the drain sends it again, in order).
struct Request {
    topic: String,
    payload: Bytes,
    epoch: u64,
    ack: Ack,
}

/// How a link settled a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The cloud PUBACKed it.
    Acked,
    /// It cannot be sent on an MQTT link at all (e.g. too long a topic):
    /// sending it again would fail again.
    Unsendable,
}

/// A request's settlement, back to the drain: `(token, None)` = failed.
type Settled = (u64, Option<Sent>);

/// Settles one request exactly once; dropping it unsettled reports a
/// failure. The drain's channel is unbounded, but it holds at most one
/// entry per request in flight, which the drain bounds.
struct Ack {
    token: u64,
    tx: mpsc::UnboundedSender<Settled>,
    done: bool,
}

impl Ack {
    fn send(mut self, how: Sent) {
        self.done = true;
        let _ = self.tx.send((self.token, Some(how)));
    }

    /// The drain is gone (hub stopping).
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send((self.token, None));
        }
    }
}

/// A link's state, as the drain and the stats see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    /// Connected, in this link epoch.
    Up(u64),
    /// Not connected: not yet, or the network (why).
    Down(String),
    /// The cloud refused the identity's CONNECT (its return code): not a
    /// network failure, so the link retries with back-off and only this
    /// identity's messages wait.
    Refused(String),
}

/// The drain's handle on one identity's link task.
struct Link {
    tx: mpsc::Sender<Request>,
    state: watch::Receiver<LinkState>,
}

/// The identity whose link is the overall connectivity probe: the edge
/// device when the hub holds its key (config-file mode), else the hub's own
/// module identity `{d}/$edgeHub` (edge environment: verged keeps the device
/// key and hands the hub only module keys).
fn edge_identity(state: &HubState, device: DeviceId) -> ClientId {
    let as_device = ClientId::device(device.clone());
    if state.sas.key_for(&as_device).is_some() {
        return as_device;
    }
    match ModuleId::new("$edgeHub") {
        Ok(m) => ClientId::module(device, m),
        Err(_) => as_device,
    }
}

/// The sender of a stored message (stamped by the router on ingest).
fn sender(m: &StoredMessage) -> Option<ClientId> {
    let d = DeviceId::new(m.message.system.connection_device_id.as_deref()?).ok()?;
    Some(match m.message.system.connection_module_id.as_deref() {
        Some(module) => ClientId::module(d, ModuleId::new(module).ok()?),
        None => ClientId::device(d),
    })
}

/// The telemetry topic a stored message is sent upstream on, with its
/// property bag (message id, correlation id, content type/encoding, output
/// name, application properties). The connection ids are left out: the
/// cloud stamps them from the authenticated identity.
pub fn upstream_topic(id: &ClientId, m: &StoredMessage) -> String {
    let mut sys = m.message.system.clone();
    sys.connection_device_id = None;
    sys.connection_module_id = None;
    sys.connection_auth_method = None;
    sys.enqueued_time = None;
    sys.input_name = None;
    let bag = encode_bag(&sys, &m.message.properties);
    match &id.module {
        Some(module) => format!(
            "devices/{}/modules/{module}/messages/events/{bag}",
            id.device
        ),
        None => format!("devices/{}/messages/events/{bag}", id.device),
    }
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
            let key = state.sas.key_for(id)?;
            // Twice the window: a full batch read at the window's edge fits.
            let (tx, rx) = mpsc::channel(self.window * 2);
            let (state_tx, link_state) = watch::channel(LinkState::Down("connecting".into()));
            self.tasks.spawn(run_link(
                self.shared.clone(),
                state.clone(),
                id.clone(),
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
        let ids: Vec<ClientId> = state.sas.keys().keys().cloned().collect();
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
                q.checkpointed = Some(up_to);
                let c = Checkpoint {
                    priority: *priority,
                    up_to,
                };
                if ckpt_tx.send(c).await.is_err() {
                    tracing::error!("upstream: the checkpoint task ended");
                    return;
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

/// How a connected session ended.
enum End {
    /// The drain is gone (hub stopping).
    Closed,
    /// The token is about to expire: reconnect now with a fresh one.
    Renew,
    /// The link failed.
    Lost(String),
    /// The cloud refused the identity's CONNECT (return code).
    Refused(String),
}

/// Something a link's helper tasks (method and C2D relays) ask its session
/// to send.
enum Op {
    /// A QoS 0 publish (a method's answer).
    Publish { topic: String, payload: Bytes },
    /// The PUBACK of a cloud publish received in session `generation` (a
    /// C2D message the leaf device acknowledged = complete). Dropped if the
    /// session has changed since: packet ids are per connection.
    PubAck { generation: u64, pkid: u16 },
}

/// A link task's long-lived parts, kept across its sessions.
struct LinkIo {
    state: Arc<HubState>,
    /// The identity (`d` or `d/m`).
    name: String,
    /// A downstream device (gets C2D).
    leaf: bool,
    rx: mpsc::Receiver<Request>,
    ops_tx: mpsc::Sender<Op>,
    ops_rx: mpsc::Receiver<Op>,
    /// Method and C2D relays in progress (aborted with the link).
    relays: JoinSet<()>,
    /// Counts sessions, so a relay's PUBACK goes only to the connection
    /// its publish came on.
    generation: u64,
    /// Counts lost connections (a token renewal keeps it): the drain's
    /// requests of an older epoch are not sent.
    epoch: u64,
    /// Changes when a reported patch is queued.
    reported: watch::Receiver<u64>,
}

/// One identity's link: connect, serve, reconnect, forever.
async fn run_link(
    shared: Arc<Shared>,
    state: Arc<HubState>,
    id: ClientId,
    key: SharedAccessKey,
    rx: mpsc::Receiver<Request>,
    link_state: watch::Sender<LinkState>,
) {
    let name = id.to_string();
    let is_edge = id.module.is_none() && id.device.as_str() == state.cfg.device_id;
    let (ops_tx, ops_rx) = mpsc::channel(MAX_RELAYS);
    let mut io = LinkIo {
        reported: state.twins.reported_watch(),
        leaf: id.module.is_none() && !is_edge,
        name: name.clone(),
        state: state.clone(),
        rx,
        ops_tx,
        ops_rx,
        relays: JoinSet::new(),
        generation: 0,
        epoch: 0,
    };
    let stats = &state.stats.upstream;
    let interval = Duration::from_millis(shared.up.cfg.reconnect_ms);
    // Pause before the next attempt after a refusal: doubles up to
    // REFUSED_BACKOFF_MAX, so an identity the cloud does not know (or whose
    // key is wrong) costs it one CONNECT a minute, not one per interval.
    let mut refused_backoff = interval;
    // Last logged state, so transitions are logged once, not per attempt.
    let mut logged: Option<&'static str> = None;
    let set = |s: LinkState| {
        stats.set_link(&name, &s);
        let up = matches!(s, LinkState::Up(_));
        link_state.send_replace(s);
        if is_edge && stats.online.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("upstream online");
            } else {
                tracing::warn!("upstream offline");
            }
        }
    };
    set(LinkState::Down("connecting".into()));
    loop {
        let started = Instant::now();
        let end =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&shared.up, &id, &key)).await {
                Ok(Ok(stream)) => {
                    if logged != Some("up") {
                        tracing::info!(identity = %name, "upstream link connected");
                    }
                    logged = Some("up");
                    refused_backoff = interval;
                    set(LinkState::Up(io.epoch));
                    shared.link_up.notify_one();
                    io.generation += 1;
                    // A token renewal keeps the link "up": requests wait in
                    // the channel for the next session instead of failing.
                    session(&shared.up.cfg, stream, &mut io).await
                }
                Ok(Err(ConnectError::Refused(code))) => End::Refused(code),
                Ok(Err(ConnectError::Failed(e))) => End::Lost(e),
                Err(_) => End::Lost("connection attempt timed out".into()),
            };
        let now = Instant::now();
        // At least a short pause, so a cloud that accepts and then drops us
        // at once is not hammered.
        let next = match end {
            End::Closed => return,
            End::Renew => continue,
            End::Lost(why) => {
                io.epoch += 1;
                if logged != Some("down") {
                    tracing::warn!(identity = %name, reason = %why, retry_every = ?interval, "upstream link down");
                } else {
                    tracing::debug!(identity = %name, reason = %why, "upstream connection attempt failed");
                }
                logged = Some("down");
                set(LinkState::Down(why));
                (started + interval).max(now + Duration::from_millis(10))
            }
            End::Refused(code) => {
                io.epoch += 1;
                if logged != Some("refused") {
                    tracing::warn!(
                        identity = %name,
                        code = %code,
                        "upstream: the cloud refused this identity; its messages wait (others pass), retrying with back-off"
                    );
                } else {
                    tracing::debug!(identity = %name, code = %code, retry_in = ?refused_backoff, "upstream identity still refused");
                }
                logged = Some("refused");
                set(LinkState::Refused(code));
                let at = started + refused_backoff;
                refused_backoff = (refused_backoff * 2).min(REFUSED_BACKOFF_MAX).max(interval);
                at.max(now + Duration::from_millis(10))
            }
        };
        // While down, fail what the drain sends (it checks the link state
        // first, so this only catches races) instead of queueing it, and
        // drop what relays finish: the cloud's side of those is gone with
        // the connection (it redelivers C2D; a method caller times out).
        loop {
            tokio::select! {
                r = io.rx.recv() => match r {
                    Some(req) => drop(req),
                    None => return,
                },
                Some(op) = io.ops_rx.recv() => drop(op),
                Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
                () = tokio::time::sleep_until(next) => break,
            }
        }
    }
}

/// Why a connection attempt failed.
enum ConnectError {
    /// The cloud answered CONNACK with a refusal (return code).
    Refused(String),
    /// Anything else: network, TLS, protocol, time-out.
    Failed(String),
}

/// Dials the cloud and completes CONNECT as `id`.
async fn connect(
    up: &Upstream,
    id: &ClientId,
    key: &SharedAccessKey,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let tcp = TcpStream::connect((up.cfg.hostname.as_str(), up.cfg.port))
        .await
        .map_err(|e| {
            ConnectError::Failed(format!("connect {}:{}: {e}", up.cfg.hostname, up.cfg.port))
        })?;
    let _ = tcp.set_nodelay(true);
    let mut stream = up
        .tls
        .connect(up.server_name.clone(), tcp)
        .await
        .map_err(|e| ConnectError::Failed(format!("TLS: {e}")))?;
    let expiry = crate::auth::unix_now() + TOKEN_TTL_SECS;
    let token = SasToken::sign(
        &format!("{}{}", up.hub_host, id.resource()),
        key,
        expiry,
        None,
    );
    let mut c = Connect::new(id.to_string());
    c.keep_alive = up.cfg.keep_alive_secs;
    // Subscriptions are made again on every connection, and in-flight
    // state lives in the store and the twins' queues: nothing to keep.
    c.clean_session = true;
    c.set_credentials(
        format!(
            "{}/{id}/?api-version={API_VERSION}&DeviceClientType={}",
            up.hub_host,
            verge_core::sas::url_encode(concat!("verge-hub/", env!("CARGO_PKG_VERSION")))
        ),
        token.to_string(),
    );
    write_packet(&mut stream, &Packet::Connect(c))
        .await
        .map_err(|e| ConnectError::Failed(format!("sending CONNECT: {e}")))?;
    let mut buf = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut buf)
        .await
        .map_err(ConnectError::Failed)?
    {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(stream),
        // The identity or its credentials: trying again at once would be
        // refused again.
        Packet::ConnAck(a)
            if matches!(
                a.code,
                ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::BadClientId
            ) =>
        {
            Err(ConnectError::Refused(format!("{:?}", a.code)))
        }
        // e.g. ServiceUnavailable (throttled): like a network failure.
        Packet::ConnAck(a) => Err(ConnectError::Failed(format!(
            "CONNECT refused: {:?}",
            a.code
        ))),
        other => Err(ConnectError::Failed(format!(
            "expected CONNACK, got {:?}",
            other.packet_type()
        ))),
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(w: &mut W, p: &Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, MAX_OUTBOUND_PACKET)
        .map_err(|e| format!("cannot encode: {e}"))?;
    w.write_all(&out).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())
}

/// Reads one packet. Cancel-safe: bytes read stay in `buf`.
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, String> {
    loop {
        if !buf.is_empty() {
            match Packet::read(buf, MAX_INBOUND_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("malformed packet from the cloud: {e}")),
            }
        }
        match r.read_buf(buf).await {
            Ok(0) => return Err("connection closed by the cloud".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A twin request sent on a link, by `$rid`.
enum TwinReq {
    /// Full GET: the cloud's twin replaces the cached one.
    Sync,
    /// Reported patch `seq` of the identity's queue.
    Reported(u64),
}

/// What a session must do after handling an inbound packet.
enum Next {
    Continue,
    /// GET the full twin (desired versions were skipped).
    Resync,
}

/// Serves a connected link: subscribes (twin responses, desired patches,
/// methods, C2D for a downstream device), GETs the twin, publishes
/// telemetry requests and completes them on PUBACK, sends queued reported
/// patches one at a time, relays what the cloud sends, keeps the
/// connection alive. In-flight requests are dropped (= failed) when it ends.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    cfg: &UpstreamConfig,
    stream: S,
    io: &mut LinkIo,
) -> End {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let mut inflight: VecDeque<(u16, Instant, Ack)> = VecDeque::new();
    let max_inflight = cfg.batch_size * PIPELINE_BATCHES;
    let ack_timeout = Duration::from_secs(cfg.ack_timeout_secs);
    // Packet id 1 is the SUBSCRIBE's; publishes use 2.. (its SUBACK is
    // back long before the ids wrap around).
    let mut next_pkid: u16 = 1;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(cfg.keep_alive_secs) / 2));
    ping.tick().await; // the first tick is immediate
    let mut ping_outstanding = false;
    let renew_at = Instant::now() + Duration::from_secs(TOKEN_TTL_SECS - RENEW_MARGIN_SECS);

    // Clean session: subscribe afresh on every connection.
    let mut filters = vec![
        SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new(
            "$iothub/twin/PATCH/properties/desired/#".into(),
            QoS::AtLeastOnce,
        ),
        SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtLeastOnce),
    ];
    if io.leaf {
        filters.push(SubscribeFilter::new(
            format!("devices/{}/messages/devicebound/#", io.name),
            QoS::AtLeastOnce,
        ));
    }
    let mut sub = Subscribe::new_many(filters);
    sub.pkid = 1;
    if let Err(e) = write_packet(&mut wr, &Packet::Subscribe(sub)).await {
        return End::Lost(e);
    }
    let mut twin_reqs: HashMap<String, (TwinReq, Instant)> = HashMap::new();
    let mut next_rid: u64 = 0;
    let mut rid = || {
        next_rid += 1;
        format!("{next_rid:x}")
    };
    // The cloud's twin first; reported patches wait for it, so the GET's
    // answer cannot already contain a patch still in the queue.
    let r = rid();
    if let Err(e) = twin_get(&mut wr, &r).await {
        return End::Lost(e);
    }
    twin_reqs.insert(r, (TwinReq::Sync, Instant::now()));
    let mut synced = false;
    let mut reported_inflight = false;
    let mut reported_retry: Option<Instant> = None;

    loop {
        // Send the next queued reported patch when nothing else of this
        // identity's twin is in flight.
        io.reported.borrow_and_update();
        if reported_retry.is_some_and(|at| Instant::now() >= at) {
            reported_retry = None;
        }
        if synced
            && !reported_inflight
            && reported_retry.is_none()
            && let Some(p) = io.state.twins.next_reported(&io.name)
        {
            let r = rid();
            let mut pb = Publish::new(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={r}"),
                QoS::AtMostOnce,
                Vec::new(),
            );
            pb.payload = serde_json::to_vec(&p.patch).unwrap_or_default().into();
            if let Err(e) = write_packet(&mut wr, &Packet::Publish(pb)).await {
                return End::Lost(e);
            }
            twin_reqs.insert(r, (TwinReq::Reported(p.seq), Instant::now()));
            reported_inflight = true;
        }
        let twin_deadline = twin_reqs.values().map(|(_, at)| *at + ack_timeout).min();
        let ack_deadline = inflight.front().map(|(_, at, _)| *at + ack_timeout);
        // Past the renewal time, take nothing new so the inflight window
        // empties and the link can reconnect with a fresh token.
        let renewing = Instant::now() >= renew_at;
        tokio::select! {
            r = read_packet(&mut rd, &mut buf) => match r {
                Ok(Packet::PubAck(a)) => {
                    if let Some(pos) = inflight.iter().position(|(id, _, _)| *id == a.pkid)
                        && let Some((_, _, tx)) = inflight.remove(pos)
                    {
                        tx.send(Sent::Acked);
                    }
                }
                Ok(Packet::SubAck(a)) => {
                    if a.return_codes.contains(&SubscribeReasonCode::Failure) {
                        tracing::warn!(identity = %io.name, codes = ?a.return_codes, "the cloud refused a subscription");
                    }
                }
                Ok(Packet::Publish(p)) => {
                    let twin_res = twin_response(&p.topic);
                    if let Some((status, r)) = twin_res {
                        match twin_reqs.remove(&r) {
                            Some((TwinReq::Sync, _)) => {
                                on_twin(io, status, &p.payload).await;
                                synced = true;
                            }
                            Some((TwinReq::Reported(seq), _)) => {
                                reported_inflight = false;
                                if on_reported(io, seq, status).await {
                                    reported_retry = Some(Instant::now() + REPORTED_RETRY);
                                }
                            }
                            None => tracing::debug!(identity = %io.name, rid = %r, "twin response for no request"),
                        }
                        continue;
                    }
                    match on_publish(io, p, &mut wr).await {
                        Ok(Next::Continue) => {}
                        Ok(Next::Resync) => {
                            if !twin_reqs.values().any(|(k, _)| matches!(k, TwinReq::Sync)) {
                                let r = rid();
                                if let Err(e) = twin_get(&mut wr, &r).await {
                                    return End::Lost(e);
                                }
                                twin_reqs.insert(r, (TwinReq::Sync, Instant::now()));
                            }
                        }
                        Err(e) => return End::Lost(e),
                    }
                }
                Ok(Packet::PingResp) => ping_outstanding = false,
                Ok(Packet::Disconnect) => return End::Lost("the cloud sent DISCONNECT".into()),
                Ok(other) => {
                    tracing::debug!(packet = ?other.packet_type(), "upstream: unexpected packet ignored");
                }
                Err(e) => return End::Lost(e),
            },
            r = io.rx.recv(), if inflight.len() < max_inflight && !renewing => {
                let Some(mut req) = r else { return End::Closed };
                // Everything already waiting (up to the window) goes out in
                // one write: one TLS record and syscall per burst, not per
                // message.
                let mut out = BytesMut::new();
                loop {
                    if req.epoch != io.epoch || req.ack.is_closed() {
                        // Sent before a lost connection, or abandoned by the
                        // drain: it goes out again from the store, in order.
                        drop(req);
                    } else {
                        // A packet id not in flight (never 0 or 1).
                        loop {
                            next_pkid = next_pkid.checked_add(1).unwrap_or(2);
                            if !inflight.iter().any(|(id, _, _)| *id == next_pkid) {
                                break;
                            }
                        }
                        let mut p = Publish::from_bytes(req.topic, QoS::AtLeastOnce, req.payload);
                        p.pkid = next_pkid;
                        if let Err(e) = Packet::Publish(p).write(&mut out, MAX_OUTBOUND_PACKET) {
                            // Not sendable at all (the drain checks first, so
                            // this is a safety net): settle it, not the link.
                            tracing::warn!(identity = %io.name, error = %e, "upstream message cannot be encoded");
                            req.ack.send(Sent::Unsendable);
                        } else {
                            inflight.push_back((next_pkid, Instant::now(), req.ack));
                        }
                    }
                    if inflight.len() >= max_inflight || out.len() >= WRITE_BURST_BYTES {
                        break;
                    }
                    match io.rx.try_recv() {
                        Ok(next) => req = next,
                        Err(_) => break,
                    }
                }
                if let Err(e) = wr.write_all(&out).await {
                    return End::Lost(e.to_string());
                }
                if let Err(e) = wr.flush().await {
                    return End::Lost(e.to_string());
                }
            }
            Some(op) = io.ops_rx.recv() => {
                let packet = match op {
                    Op::Publish { topic, payload } => {
                        Some(Packet::Publish(Publish::from_bytes(topic, QoS::AtMostOnce, payload)))
                    }
                    Op::PubAck { generation, pkid } => {
                        (generation == io.generation).then(|| Packet::PubAck(PubAck::new(pkid)))
                    }
                };
                if let Some(packet) = packet
                    && let Err(e) = write_packet(&mut wr, &packet).await
                {
                    return End::Lost(e);
                }
            }
            Ok(()) = io.reported.changed() => {}
            () = sleep_until_opt(reported_retry) => {}
            () = sleep_until_opt(twin_deadline) => {
                // An unanswered twin request does not cost the link (its
                // telemetry keeps flowing): the GET is given up (the cached
                // twin stays), a reported patch is sent again later.
                let now = Instant::now();
                twin_reqs.retain(|_, (kind, at)| {
                    if *at + ack_timeout > now {
                        return true;
                    }
                    tracing::warn!(identity = %io.name, "no twin response from the cloud in time");
                    match kind {
                        TwinReq::Sync => synced = true,
                        TwinReq::Reported(_) => {
                            reported_inflight = false;
                            reported_retry = Some(now + REPORTED_RETRY);
                        }
                    }
                    false
                });
            }
            Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
            _ = ping.tick() => {
                if ping_outstanding {
                    return End::Lost("no PINGRESP within the keep-alive".into());
                }
                if let Err(e) = write_packet(&mut wr, &Packet::PingReq).await {
                    return End::Lost(e);
                }
                ping_outstanding = true;
            }
            () = sleep_until_opt(ack_deadline) => {
                return End::Lost(format!("no PUBACK within {}s", cfg.ack_timeout_secs));
            }
            () = tokio::time::sleep_until(renew_at), if inflight.is_empty() && twin_reqs.is_empty() => {
                let _ = write_packet(&mut wr, &Packet::Disconnect).await;
                return End::Renew;
            }
        }
    }
}

/// Sends a twin GET with request id `rid`.
async fn twin_get<W: AsyncWrite + Unpin>(wr: &mut W, rid: &str) -> Result<(), String> {
    let p = Publish::new(
        format!("$iothub/twin/GET/?$rid={rid}"),
        QoS::AtMostOnce,
        Vec::new(),
    );
    write_packet(wr, &Packet::Publish(p)).await
}

/// `(status, rid)` of a `$iothub/twin/res/{status}/?$rid={rid}` topic.
fn twin_response(topic: &[u8]) -> Option<(u16, String)> {
    let rest = std::str::from_utf8(topic)
        .ok()?
        .strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once('/')?;
    let query = query.strip_prefix('?').unwrap_or(query);
    Some((status.parse().ok()?, topic::query_param(query, "$rid")?))
}

/// The answer to the twin GET: the cloud's twin replaces the cached one,
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
async fn on_publish<W: AsyncWrite + Unpin>(
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
        let Some(conn) = io.state.sessions.deliverable(&io.name, &topic) else {
            tracing::info!(identity = %io.name, "C2D message for a device not connected here; left unacknowledged");
            return Ok(Next::Continue);
        };
        let (generation, pkid, ops) = (io.generation, p.pkid, io.ops_tx.clone());
        let name = io.name.clone();
        let (tx, rx) = oneshot::channel();
        let out = Outbound {
            topic,
            payload: p.payload,
            ack: qos1.then_some(tx),
        };
        io.relays.spawn(async move {
            let delivered = async {
                conn.tx.send(out).await.ok()?;
                if !qos1 {
                    // Nothing to acknowledge upstream.
                    return None;
                }
                rx.await.ok()
            };
            match tokio::time::timeout(C2D_ACK_TIMEOUT, delivered).await {
                Ok(Some(())) => {
                    let _ = ops.send(Op::PubAck { generation, pkid }).await;
                }
                _ if qos1 => {
                    tracing::info!(identity = %name, "C2D message not acknowledged by the device")
                }
                _ => {}
            }
        });
        return Ok(Next::Continue);
    }
    if qos1 {
        write_packet(wr, &Packet::PubAck(PubAck::new(p.pkid))).await?;
    }
    if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
        let Ok(patch) = serde_json::from_slice::<Value>(&p.payload) else {
            tracing::warn!(identity = %io.name, "desired patch from the cloud is not JSON; resyncing");
            return Ok(Next::Resync);
        };
        return Ok(
            match io.state.twins.cloud_desired_patch(&io.name, &patch).await {
                CloudPatch::Push(msg, version) => {
                    desired_changed(io, &msg, version).await;
                    Next::Continue
                }
                CloudPatch::Stale => Next::Continue,
                CloudPatch::Gap => Next::Resync,
            },
        );
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let Some((method, query)) = rest.split_once('/') else {
            return Ok(Next::Continue);
        };
        let query = query.strip_prefix('?').unwrap_or(query);
        let Some(rid) = topic::query_param(query, "$rid") else {
            return Ok(Next::Continue);
        };
        let (state, name, method, ops) = (
            io.state.clone(),
            io.name.clone(),
            method.to_owned(),
            io.ops_tx.clone(),
        );
        let answer = move |status: i64, payload: Bytes| Op::Publish {
            topic: format!("$iothub/methods/res/{status}/?$rid={rid}"),
            payload,
        };
        if io.relays.len() >= MAX_RELAYS {
            let _ = io
                .ops_tx
                .try_send(answer(429, error_body("too many calls in progress")));
            return Ok(Next::Continue);
        }
        io.relays.spawn(async move {
            let op = match methods::relay(&state, &name, &method, p.payload, METHOD_TIMEOUT).await {
                Ok((status, payload)) => answer(status, payload),
                Err(e) => {
                    tracing::info!(identity = %name, method = %method, error = %e, "cloud method call not answered locally");
                    answer(i64::from(e.status()), error_body(&e.to_string()))
                }
            };
            let _ = ops.send(op).await;
        });
        return Ok(Next::Continue);
    }
    tracing::debug!(identity = %io.name, %topic, "publish from the cloud on an unhandled topic ignored");
    Ok(Next::Continue)
}

fn error_body(message: &str) -> Bytes {
    // Serializing a Value cannot fail.
    serde_json::to_vec(&serde_json::json!({ "message": message }))
        .unwrap_or_default()
        .into()
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_core::message::{Message, decode_bag};
    use verge_core::time::Timestamp;

    const CFG: &str = r#"
iothub_hostname = "hub.example"
device_id = "edge1"
device_key = "AAAAAAAAAAAAAAAAAAAAAA=="
storage_dir = "/tmp/x"
[tls]
cert = "c.pem"
key = "k.pem"
[modules]
filter = "gen1"
[devices]
leaf1 = "AQEBAQEBAQEBAQEBAQEBAQ=="
"#;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    #[test]
    fn credentials_come_from_the_configuration() {
        let cfg = Config::from_toml(CFG).unwrap();
        // The drain signs with what the key table holds for each identity.
        let table = crate::auth::SasAuthenticator::from_config(&cfg).unwrap();
        let device = SharedAccessKey::from_base64("AAAAAAAAAAAAAAAAAAAAAA==").unwrap();
        assert_eq!(
            table.key_for(&id("edge1")).unwrap().as_bytes(),
            device.as_bytes()
        );
        let module = device.derive_module_key(&ModuleId::new("filter").unwrap(), "gen1");
        assert_eq!(
            table.key_for(&id("edge1/filter")).unwrap().as_bytes(),
            module.as_bytes()
        );
        assert_eq!(table.key_for(&id("leaf1")).unwrap().as_bytes(), [1u8; 16]);
        // Unknown module, unknown device, a module of another device: none.
        assert!(table.key_for(&id("edge1/other")).is_none());
        assert!(table.key_for(&id("leaf2")).is_none());
        assert!(table.key_for(&id("leaf1/m")).is_none());
    }

    fn stored(msg: Message) -> StoredMessage {
        StoredMessage {
            id: verge_store::MessageId(1),
            priority: 0,
            offset: 0,
            enqueued: Timestamp::now(),
            expiry: None,
            message: msg,
        }
    }

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

    #[test]
    fn topic_keeps_the_bag_but_not_the_hub_stamps() {
        let mut msg = Message::new("x");
        msg.system.message_id = Some("m1".into());
        msg.system.correlation_id = Some("c1".into());
        msg.system.content_type = Some("application/json".into());
        msg.system.output_name = Some("out1".into());
        msg.system.connection_device_id = Some("edge1".into());
        msg.system.connection_module_id = Some("filter".into());
        msg.system.enqueued_time = Some(Timestamp::now());
        msg.properties.insert("k", "v w");
        let m = stored(msg);
        let from = sender(&m).unwrap();
        assert_eq!(from, id("edge1/filter"));
        let topic = upstream_topic(&from, &m);
        let bag = topic
            .strip_prefix("devices/edge1/modules/filter/messages/events/")
            .unwrap();
        let (sys, app) = decode_bag(bag).unwrap();
        assert_eq!(sys.message_id.as_deref(), Some("m1"));
        assert_eq!(sys.correlation_id.as_deref(), Some("c1"));
        assert_eq!(sys.content_type.as_deref(), Some("application/json"));
        assert_eq!(sys.output_name.as_deref(), Some("out1"));
        assert!(sys.connection_device_id.is_none() && sys.connection_module_id.is_none());
        assert_eq!(app.get("k"), Some("v w"));

        let mut leaf = Message::new("y");
        leaf.system.connection_device_id = Some("leaf1".into());
        let m = stored(leaf);
        let from = sender(&m).unwrap();
        assert_eq!(upstream_topic(&from, &m), "devices/leaf1/messages/events/");
    }
}
