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
//!   are opened when their identity first has something to send, and kept.
//! * A link that is down tries again every `reconnect_ms` (≤ 5 s, measured
//!   from the start of the previous attempt; each attempt is bounded by
//!   [`HANDSHAKE_TIMEOUT`]). Connecting wakes the drain, so a backlog starts
//!   moving as soon as the link is back. Transitions are logged once, not
//!   every attempt. A dead link is found by keep-alive (PINGREQ every
//!   keep_alive/2, no PINGRESP by the next one = down) or by a PUBACK that
//!   does not come within `ack_timeout_secs`.
//! * **Drain.** One task reads batches (`batch_size`) from the store (highest
//!   priority queue first, FIFO), groups them by sender, publishes each group
//!   QoS 1 in order on the sender's link (pipelined, up to a batch in
//!   flight), and checkpoints the store up to the longest prefix of the batch
//!   the cloud PUBACKed. Anything after the first unacknowledged message is
//!   read again from the checkpoint (rewind) once a link comes back:
//!   at-least-once, order kept per sender. A sender that cannot reach the
//!   cloud holds the queue back for everyone, because a store checkpoint is a
//!   prefix.
//! * Our own MQTT client on `rumqttc`'s packet codec rather than its
//!   `EventLoop`: the event loop keeps and replays unacknowledged publishes
//!   itself across reconnects, while here the store is the single source of
//!   truth — a lost connection simply fails what was in flight. (verge-sdk's
//!   engine is built on that event loop and depends on verge-daemon.)
//! * Expired messages are skipped by the store's reads; the `$upstream`
//!   queues' expired counts are mirrored into [`UpstreamStats::expired`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use verge_core::message::encode_bag;
use verge_core::{ClientId, DeviceId, ModuleId, SasToken, SharedAccessKey};
use verge_store::StoredMessage;

use crate::HubState;
use crate::config::{Config, UpstreamConfig};

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
/// Largest packet accepted from the cloud (we only expect acks).
const MAX_INBOUND_PACKET: usize = 1 << 20;
/// How long the drain sleeps when it was not woken (safety net).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Upstream counters and link states (part of the hub's [`crate::Stats`]).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Messages the cloud acknowledged and the store checkpointed.
    pub sent: AtomicU64,
    /// `$upstream` messages dropped because their TTL ran out first.
    pub expired: AtomicU64,
    /// Messages dropped because the hub holds no credentials for their
    /// sender any more (e.g. a module removed from the configuration).
    pub dropped_no_identity: AtomicU64,
    /// The overall link state: the edge device's own link is up.
    pub online: AtomicBool,
    links: Mutex<BTreeMap<String, bool>>,
}

impl UpstreamStats {
    /// Each identity's link state (true = connected), by identity.
    pub fn links(&self) -> BTreeMap<String, bool> {
        lock(&self.links).clone()
    }

    fn set_link(&self, id: &str, up: bool) {
        lock(&self.links).insert(id.to_owned(), up);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let edge = match DeviceId::new(state.cfg.device_id.as_str()) {
            Ok(d) => ClientId::device(d),
            Err(e) => {
                tracing::error!(error = %e, "device_id is invalid; no upstream");
                return;
            }
        };
        let mut drain = Drain {
            links: HashMap::new(),
            tasks: JoinSet::new(),
            refused: HashSet::new(),
            edge: edge.clone(),
            shared,
        };
        // The edge device's link: the overall connectivity probe.
        drain.link(&state, &edge);
        drain.run(state).await;
    }
}

struct Shared {
    up: Upstream,
    /// Woken whenever a link connects (one waiter: the drain). `notify_one`
    /// keeps a permit, so a link coming up between the drain's failure and
    /// its wait is not missed.
    link_up: Notify,
}

/// A publish handed to a link; `ack` completes on the cloud's PUBACK and is
/// dropped if the link goes down first.
struct Request {
    topic: String,
    payload: Bytes,
    ack: oneshot::Sender<()>,
}

/// The drain's handle on one identity's link task.
struct Link {
    tx: mpsc::Sender<Request>,
    online: watch::Receiver<bool>,
}

/// The credentials the hub holds for `id`: the edge device's key, a module
/// key derived from it, or a downstream device's configured key.
pub fn key_for(cfg: &Config, id: &ClientId) -> Option<SharedAccessKey> {
    if id.device.as_str() == cfg.device_id {
        let device_key = SharedAccessKey::from_base64(&cfg.device_key).ok()?;
        match &id.module {
            None => Some(device_key),
            Some(m) => cfg
                .modules
                .get(m.as_str())
                .map(|generation| device_key.derive_module_key(m, generation)),
        }
    } else if id.module.is_none() {
        cfg.devices
            .get(id.device.as_str())
            .and_then(|k| SharedAccessKey::from_base64(k).ok())
    } else {
        None
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

struct Drain {
    shared: Arc<Shared>,
    links: HashMap<ClientId, Link>,
    /// Link tasks; dropped (so aborted) with the drain when the hub stops.
    tasks: JoinSet<()>,
    /// Identities without credentials, warned about once.
    refused: HashSet<ClientId>,
    /// The edge device itself.
    edge: ClientId,
}

impl Drain {
    /// The link of `id`, started on first use; `None` without credentials.
    fn link(&mut self, state: &Arc<HubState>, id: &ClientId) -> Option<&Link> {
        if !self.links.contains_key(id) {
            let key = key_for(&state.cfg, id)?;
            let cap = self.shared.up.cfg.batch_size;
            let (tx, rx) = mpsc::channel(cap);
            let (online_tx, online) = watch::channel(false);
            self.tasks.spawn(run_link(
                self.shared.clone(),
                state.clone(),
                id.clone(),
                key,
                rx,
                online_tx,
            ));
            self.links.insert(id.clone(), Link { tx, online });
        }
        self.links.get(id)
    }

    fn edge_online(&self) -> bool {
        self.links
            .get(&self.edge)
            .is_some_and(|l| *l.online.borrow())
    }

    async fn run(mut self, state: Arc<HubState>) {
        let notify = state.endpoint_notify(ENDPOINT);
        let batch_size = self.shared.up.cfg.batch_size;
        let retry = Duration::from_millis(self.shared.up.cfg.reconnect_ms);
        loop {
            // Read only while the cloud is reachable: a read while offline
            // would be rewound anyway, and the store counts a message that
            // expires after being read once as seen, not as expired.
            if !self.edge_online() {
                tokio::select! {
                    () = self.shared.link_up.notified() => {}
                    () = tokio::time::sleep(retry) => {}
                }
                continue;
            }
            let batch = match state.store.read(ENDPOINT, batch_size).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "upstream: store read failed");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            mirror_expired(&state).await;
            let Some(first) = batch.first() else {
                tokio::select! {
                    () = notify.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            };
            let priority = first.priority;
            let outcome = self.send_batch(&state, &batch).await;
            let done = outcome
                .iter()
                .take_while(|o| **o != Outcome::Pending)
                .count();
            if done > 0 {
                let up_to = batch[done - 1].offset;
                if let Err(e) = state.store.ack(ENDPOINT, priority, up_to).await {
                    // Not checkpointed: the messages go out again (at-least-once).
                    tracing::error!(error = %e, "upstream: store checkpoint failed");
                    state.store.rewind(ENDPOINT);
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
                // Counted once checkpointed, so a retried batch is not counted twice.
                let count = |want| outcome[..done].iter().filter(|o| **o == want).count() as u64;
                let stats = &state.stats.upstream;
                stats
                    .sent
                    .fetch_add(count(Outcome::Acked), Ordering::Relaxed);
                stats
                    .dropped_no_identity
                    .fetch_add(count(Outcome::Dropped), Ordering::Relaxed);
            }
            if done < batch.len() {
                // Some sender's link is down: read again from the checkpoint
                // once a link connects (or after one reconnect interval).
                state.store.rewind(ENDPOINT);
                tokio::select! {
                    () = self.shared.link_up.notified() => {}
                    () = tokio::time::sleep(retry) => {}
                }
            }
        }
    }

    /// Publishes a batch, each sender's messages in order on its own link;
    /// returns what became of each message.
    async fn send_batch(&mut self, state: &Arc<HubState>, batch: &[StoredMessage]) -> Vec<Outcome> {
        let mut done = vec![Outcome::Pending; batch.len()];
        let mut waits: Vec<(usize, oneshot::Receiver<()>)> = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            // A message without a sender stamp (none are stored that way) goes
            // out as the edge device's.
            let id = sender(m).unwrap_or_else(|| self.edge.clone());
            let topic = upstream_topic(&id, m);
            let Some(link) = self.link(state, &id) else {
                if self.refused.insert(id.clone()) {
                    tracing::warn!(identity = %id, "upstream: no credentials for this sender; dropping its messages");
                }
                done[i] = Outcome::Dropped;
                continue;
            };
            // Stop at the first sender that cannot send: everything after it
            // is beyond the checkpoint and would only be sent twice.
            if !*link.online.borrow() {
                break;
            }
            let (tx, rx) = oneshot::channel();
            let req = Request {
                topic,
                payload: m.message.body.clone(),
                ack: tx,
            };
            // The channel holds a batch, so this only waits for the link to
            // take earlier requests.
            if link.tx.send(req).await.is_err() {
                // The link task is gone (it only ends by panicking): start a
                // new one next time.
                tracing::error!(identity = %id, "upstream link task ended; restarting it");
                self.links.remove(&id);
                break;
            }
            waits.push((i, rx));
        }
        // Every request resolves: PUBACK, or dropped when the link fails
        // (the link enforces ack_timeout); the timeout is a safety net.
        let limit = Duration::from_secs(self.shared.up.cfg.ack_timeout_secs.saturating_mul(2));
        let deadline = Instant::now() + limit;
        for (i, rx) in waits {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx).await {
                done[i] = Outcome::Acked;
            }
        }
        done
    }
}

/// What became of one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not sent, or not acknowledged: goes out again from the checkpoint.
    Pending,
    /// The cloud PUBACKed it.
    Acked,
    /// Dropped: no credentials for its sender.
    Dropped,
}

/// Copies the `$upstream` queues' TTL-drop counts into the stats.
async fn mirror_expired(state: &HubState) {
    if let Ok(queues) = state.store.queues().await {
        let n: u64 = queues
            .iter()
            .filter(|q| q.endpoint == ENDPOINT)
            .map(|q| q.expired)
            .sum();
        state.stats.upstream.expired.store(n, Ordering::Relaxed);
    }
}

/// How a connected session ended.
enum End {
    /// The drain is gone (hub stopping).
    Closed,
    /// The token is about to expire: reconnect now with a fresh one.
    Renew,
    /// The link failed.
    Lost(String),
}

/// One identity's link: connect, serve publishes, reconnect, forever.
async fn run_link(
    shared: Arc<Shared>,
    state: Arc<HubState>,
    id: ClientId,
    key: SharedAccessKey,
    mut rx: mpsc::Receiver<Request>,
    online: watch::Sender<bool>,
) {
    let name = id.to_string();
    let is_edge = id.module.is_none() && id.device.as_str() == state.cfg.device_id;
    let stats = &state.stats.upstream;
    let interval = Duration::from_millis(shared.up.cfg.reconnect_ms);
    // Last logged state, so transitions are logged once, not per attempt.
    let mut logged: Option<bool> = None;
    let set = |up: bool| {
        online.send_replace(up);
        stats.set_link(&name, up);
        if is_edge && stats.online.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("upstream online");
            } else {
                tracing::warn!("upstream offline");
            }
        }
    };
    set(false);
    loop {
        let started = Instant::now();
        let end =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&shared.up, &id, &key)).await {
                Ok(Ok(stream)) => {
                    if logged != Some(true) {
                        tracing::info!(identity = %name, "upstream link connected");
                    }
                    logged = Some(true);
                    set(true);
                    shared.link_up.notify_one();
                    // A token renewal keeps the link "up": requests wait in
                    // the channel for the next session instead of failing.
                    session(&shared.up.cfg, stream, &mut rx).await
                }
                Ok(Err(e)) => End::Lost(e),
                Err(_) => End::Lost("connection attempt timed out".into()),
            };
        let now = Instant::now();
        let next = match end {
            End::Closed => return,
            End::Renew => continue,
            End::Lost(why) => {
                set(false);
                if logged != Some(false) {
                    tracing::warn!(identity = %name, reason = %why, retry_every = ?interval, "upstream link down");
                } else {
                    tracing::debug!(identity = %name, reason = %why, "upstream connection attempt failed");
                }
                logged = Some(false);
                // At least a short pause, so a cloud that accepts and then
                // drops us at once is not hammered.
                (started + interval).max(now + Duration::from_millis(10))
            }
        };
        // While down, fail what the drain sends (it checks the link state
        // first, so this only catches races) instead of queueing it.
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(req) => drop(req),
                    None => return,
                },
                () = tokio::time::sleep_until(next) => break,
            }
        }
    }
}

/// Dials the cloud and completes CONNECT as `id`.
async fn connect(
    up: &Upstream,
    id: &ClientId,
    key: &SharedAccessKey,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect((up.cfg.hostname.as_str(), up.cfg.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", up.cfg.hostname, up.cfg.port))?;
    let _ = tcp.set_nodelay(true);
    let mut stream = up
        .tls
        .connect(up.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let expiry = crate::auth::unix_now() + TOKEN_TTL_SECS;
    let token = SasToken::sign(
        &format!("{}{}", up.hub_host, id.resource()),
        key,
        expiry,
        None,
    );
    let mut c = Connect::new(id.to_string());
    c.keep_alive = up.cfg.keep_alive_secs;
    // Telemetry only, nothing subscribed: no session state worth keeping.
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
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut buf = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut buf).await? {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(stream),
        Packet::ConnAck(a) => Err(format!("CONNECT refused: {:?}", a.code)),
        other => Err(format!("expected CONNACK, got {:?}", other.packet_type())),
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(w: &mut W, p: &Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, verge_core::message::MAX_MESSAGE_SIZE + 64 * 1024)
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

/// Serves a connected link: publishes requests, completes them on PUBACK,
/// keeps the connection alive. In-flight requests are dropped (= failed)
/// when it ends.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    cfg: &UpstreamConfig,
    stream: S,
    rx: &mut mpsc::Receiver<Request>,
) -> End {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let mut inflight: VecDeque<(u16, Instant, oneshot::Sender<()>)> = VecDeque::new();
    let max_inflight = cfg.batch_size;
    let ack_timeout = Duration::from_secs(cfg.ack_timeout_secs);
    let mut next_pkid: u16 = 0;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(cfg.keep_alive_secs) / 2));
    ping.tick().await; // the first tick is immediate
    let mut ping_outstanding = false;
    let renew_at = Instant::now() + Duration::from_secs(TOKEN_TTL_SECS - RENEW_MARGIN_SECS);
    loop {
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
                        let _ = tx.send(());
                    }
                }
                Ok(Packet::PingResp) => ping_outstanding = false,
                Ok(Packet::Disconnect) => return End::Lost("the cloud sent DISCONNECT".into()),
                Ok(other) => {
                    // Nothing is subscribed, so nothing else is expected.
                    tracing::debug!(packet = ?other.packet_type(), "upstream: unexpected packet ignored");
                }
                Err(e) => return End::Lost(e),
            },
            r = rx.recv(), if inflight.len() < max_inflight && !renewing => {
                let Some(req) = r else { return End::Closed };
                // A packet id not in flight (never 0).
                loop {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    if !inflight.iter().any(|(id, _, _)| *id == next_pkid) {
                        break;
                    }
                }
                let mut p = Publish::from_bytes(req.topic, QoS::AtLeastOnce, req.payload);
                p.pkid = next_pkid;
                if let Err(e) = write_packet(&mut wr, &Packet::Publish(p)).await {
                    return End::Lost(e);
                }
                inflight.push_back((next_pkid, Instant::now(), req.ack));
            }
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
            () = tokio::time::sleep_until(renew_at), if inflight.is_empty() => {
                let _ = write_packet(&mut wr, &Packet::Disconnect).await;
                return End::Renew;
            }
        }
    }
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
        let device = SharedAccessKey::from_base64("AAAAAAAAAAAAAAAAAAAAAA==").unwrap();
        assert_eq!(
            key_for(&cfg, &id("edge1")).unwrap().as_bytes(),
            device.as_bytes()
        );
        let module = device.derive_module_key(&ModuleId::new("filter").unwrap(), "gen1");
        assert_eq!(
            key_for(&cfg, &id("edge1/filter")).unwrap().as_bytes(),
            module.as_bytes()
        );
        assert_eq!(key_for(&cfg, &id("leaf1")).unwrap().as_bytes(), [1u8; 16]);
        // Unknown module, unknown device, a module of another device: none.
        assert!(key_for(&cfg, &id("edge1/other")).is_none());
        assert!(key_for(&cfg, &id("leaf2")).is_none());
        assert!(key_for(&cfg, &id("leaf1/m")).is_none());
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
