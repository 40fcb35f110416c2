//! The hub's upstream: drains the `$upstream` store queues to the cloud IoT
//! hub (Azure IoT Hub or verge-cloud; both speak the same MQTT dialect).
//!
//! # Design
//!
//! * **With AMQP (`UpstreamProtocol=Amqp`/`AmqpWs`), one connection for
//!   every identity**, a session each ([`amqp`]); what follows about links
//!   holds for those sessions too, with AMQP's links in place of MQTT's
//!   topics.
//! * **With MQTT, one MQTT 3.1.1/TLS connection per sending identity** (a [`Link`];
//!   with `UpstreamProtocol=MqttWs`, MQTT over WebSocket on 443, through
//!   `https_proxy` when set: [`transport`]): the
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
//!     client with the HTTP API's machinery ([`crate::methods::relay`]) and its
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
//!   engine is built on that event loop and depends on the workload client.)
//! * A message that cannot go out as an MQTT PUBLISH at all (its topic
//!   with the property bag past 65,535 bytes, or too large a packet) is
//!   settled, not retried: dropped, counted
//!   ([`UpstreamStats::dropped_unsendable`]) and logged once with its sender
//!   and message id; the checkpoint moves past it.
//! * Expired messages are skipped by the store's reads; the `$upstream`
//!   queues' expired counts are mirrored into [`UpstreamStats::expired`].

//!
//! # Files
//!
//! `mod.rs` (this: configuration, stats, what drain and links share),
//! `drain.rs` (store → links: per-sender order, read-ahead, checkpoints),
//! `link.rs` (one identity's link: connect, MQTT session, reconnect),
//! `amqp/` (the shared AMQP connection, and an identity's session on it),
//! `relay.rs` (what a link does with the cloud's twin, method and C2D traffic),
//! `transport.rs` (`UpstreamProtocol`, the proxy: how a link reaches the cloud).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{Notify, mpsc, watch};
use verge_core::message::encode_bag;
use verge_core::time::Timestamp;
use verge_core::{ClientId, DeviceId, ModuleId};
use verge_store::StoredMessage;

use crate::config::{Config, UpstreamConfig};
use crate::{HubState, lock};

mod amqp;
mod drain;
mod link;
mod relay;
pub mod transport;

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
    /// TCP or a proxy tunnel, TLS, and WebSocket for `MqttWs`.
    transport: transport::Transport,
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
        let transport = transport::Transport::resolve(up, Arc::new(tls), |k| std::env::var(k).ok())
            .with_context(|| format!("upstream.hostname {:?}", up.hostname))?;
        Ok(Some(Self {
            cfg: up.clone(),
            hub_host: cfg.iothub_hostname.clone(),
            transport,
        }))
    }

    /// Runs the upstream (links and drain) until the hub stops.
    pub async fn run(self, state: Arc<HubState>) {
        let (mux, mux_task) = if self.transport.protocol.amqp() {
            let (mux, task) = amqp::Mux::new();
            (Some(mux), Some(task))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            up: self,
            link_up: Notify::new(),
            amqp: mux,
        });
        // The shared AMQP connection's task; aborted with the drain (the
        // hub stopping) when this function returns or is dropped.
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(task) = mux_task {
            tasks.spawn(amqp::run(shared.clone(), task));
        }
        // Config validation guarantees a valid device id.
        let device = match DeviceId::new(state.cfg.device_id.as_str()) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "device_id is invalid; no upstream");
                return;
            }
        };
        let edge = edge_identity(&state, device);
        drain::run(shared, state, edge).await;
    }
}

struct Shared {
    up: Upstream,
    /// Woken whenever a link connects (one waiter: the drain). `notify_one`
    /// keeps a permit, so a link coming up between the drain's failure and
    /// its wait is not missed.
    link_up: Notify,
    /// With `Amqp`/`AmqpWs`: the one connection every identity's session
    /// rides.
    amqp: Option<amqp::Mux>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use verge_core::SharedAccessKey;
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
