//! The MQTT engine shared by [`crate::ModuleClient`] and [`crate::DeviceClient`]:
//! one persistent session (clean_session = 0), reconnects with back-off, SAS
//! renewal, one subscription per feature, acknowledged sends, and dispatch of
//! incoming publishes to bounded queues.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
use rumqttc::{
    AckMode, AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, PublishOptions,
};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use verge_core::message::decode_bag;
use verge_core::sas::url_encode;
use verge_core::{ClientId, HubHostname, Message};

use crate::auth::{TokenSource, unix_now};
use crate::{ClientOptions, Error};

/// The MQTT `api-version` the Azure SDKs send.
pub(crate) const API_VERSION: &str = "2019-10-01";

/// Topic filters, one per feature (wire notes §3).
pub(crate) const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
pub(crate) const DESIRED_PATCHES: &str = "$iothub/twin/PATCH/properties/desired/#";
pub(crate) const METHODS: &str = "$iothub/methods/POST/#";

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) hub: HubHostname,
    pub(crate) client: ClientId,
    /// `GatewayHostName` when set, else the hub: dialled and used as TLS name.
    pub(crate) dial_host: String,
    /// The gateway, when the client talks to an edge hub.
    pub(crate) gateway: Option<String>,
}

/// An incoming item waiting for the application, with the publish to acknowledge.
pub(crate) struct Delivery<T> {
    item: T,
    ack: Option<Publish>,
}

type Slot<T> = Arc<Mutex<Option<mpsc::Receiver<Delivery<T>>>>>;

/// A bounded queue whose receiving end is lent to one stream at a time.
pub(crate) struct Channel<T> {
    tx: mpsc::Sender<Delivery<T>>,
    slot: Slot<T>,
}

impl<T> Channel<T> {
    fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            slot: Arc::new(Mutex::new(Some(rx))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A stream of incoming items (module inputs, cloud-to-device messages or
/// desired-property patches). Each item is acknowledged to the hub (PUBACK)
/// when [`Incoming::recv`] hands it out; items not yet received are
/// redelivered by the hub after a reconnect. Dropping the stream gives the
/// queue back to the client, so a later call gets the items queued meanwhile.
pub struct Incoming<T> {
    rx: Option<mpsc::Receiver<Delivery<T>>>,
    slot: Slot<T>,
    mqtt: AsyncClient,
}

impl<T> std::fmt::Debug for Incoming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl<T> Incoming<T> {
    /// The next item; `None` once the client is closed. Cancel-safe (usable
    /// in `tokio::select!`): an item is either returned or stays queued.
    pub async fn recv(&mut self) -> Option<T> {
        let d = self.rx.as_mut()?.recv().await?;
        if let Some(p) = d.ack {
            match self.mqtt.try_ack(&p) {
                Ok(()) => {}
                Err(rumqttc::ClientError::RequestChannelFull(_)) => {
                    let mqtt = self.mqtt.clone();
                    tokio::spawn(async move {
                        if let Err(e) = mqtt.ack(&p).await {
                            tracing::debug!(error = %e, "cannot acknowledge a delivery");
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot acknowledge a delivery (client closing?)")
                }
            }
        }
        Some(d.item)
    }
}

impl<T> Drop for Incoming<T> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            *lock(&self.slot) = Some(rx);
        }
    }
}

/// A message that arrived on one of a module's inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMessage {
    /// The input name (`…/inputs/{name}/…`).
    pub input: String,
    /// The message, with its system and application properties.
    pub message: Message,
}

/// A direct-method call received by this client.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodRequest {
    /// The method name.
    pub name: String,
    /// The JSON payload (`null` when the caller sent none).
    pub payload: Value,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type MethodHandler = Arc<dyn Fn(MethodRequest) -> BoxFuture<(i32, Value)> + Send + Sync>;

/// A twin response: status, `$version` and body.
#[derive(Debug)]
pub(crate) struct TwinResponse {
    pub(crate) status: u16,
    pub(crate) version: Option<u64>,
    pub(crate) body: Bytes,
}

/// How many method handlers may run at once.
const MAX_CONCURRENT_METHODS: usize = 32;

/// State shared by the client handles and the engine task.
pub(crate) struct Link {
    pub(crate) id: Identity,
    pub(crate) opts: ClientOptions,
    pub(crate) mqtt: AsyncClient,
    pub(crate) tokens: TokenSource,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    send_slots: Arc<Semaphore>,
    enabled: tokio::sync::Mutex<BTreeSet<String>>,
    twin_pending: Mutex<HashMap<String, oneshot::Sender<TwinResponse>>>,
    pub(crate) inputs: Channel<InputMessage>,
    pub(crate) c2d: Channel<Message>,
    pub(crate) desired: Channel<Value>,
    method_handler: RwLock<Option<MethodHandler>>,
    method_slots: Arc<Semaphore>,
    connected: watch::Sender<bool>,
    connections: std::sync::atomic::AtomicU64,
    desired_version: Mutex<Option<u64>>,
    inputs_prefix: String,
    c2d_prefix: String,
}

/// Owns the engine task; aborts it when the last client handle goes away.
pub(crate) struct Engine {
    pub(crate) link: Arc<Link>,
    task: JoinHandle<()>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Engine {
    /// Stops the engine task (the connection drops).
    pub(crate) fn abort(&self) {
        self.task.abort();
        self.link.connected.send_replace(false);
    }
}

/// The username the Azure SDKs send: `{hub}/{clientId}/?api-version=…&DeviceClientType=…`.
pub(crate) fn username(hub: &HubHostname, client: &ClientId, product_info: &str) -> String {
    let mut ua = format!("verge-sdk/{}", env!("CARGO_PKG_VERSION"));
    if !product_info.is_empty() {
        ua.push(' ');
        ua.push_str(product_info);
    }
    format!(
        "{hub}/{client}/?api-version={API_VERSION}&DeviceClientType={}",
        url_encode(&ua)
    )
}

impl Engine {
    /// Builds the session and starts the engine task (it connects in the background).
    pub(crate) async fn start(
        id: Identity,
        opts: ClientOptions,
        tokens: TokenSource,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, Error> {
        crate::tls::install_provider();
        let (token, expiry) = tokens.token().await?;
        let mut mo = MqttOptions::new(id.client.to_string(), (id.dial_host.clone(), opts.port));
        mo.set_keep_alive(u16::try_from(opts.keep_alive.as_secs().clamp(5, 1740)).unwrap_or(60));
        mo.set_clean_session(false);
        mo.set_credentials(username(&id.hub, &id.client, &opts.product_info), token);
        let max = verge_core::message::MAX_MESSAGE_SIZE + 16 * 1024;
        mo.set_max_packet_size(max, max);
        mo.set_ack_mode(AckMode::Manual);
        // TLS on `port`, or MQTT over WebSocket there, maybe through a proxy.
        let mut dialer = verge_dial::Dialer::new(&id.dial_host, opts.port, tls.clone())
            .map_err(|e| Error::Tls(e.to_string()))?;
        if opts.websocket {
            dialer = dialer
                .with_websocket(
                    verge_dial::protocol::WS_PATH,
                    verge_dial::protocol::MQTT_SUBPROTOCOL,
                    max + 64 * 1024,
                )
                .with_proxy(opts.proxy.clone());
        }
        mo.set_socket_connector(move |_target, _net| {
            let dialer = dialer.clone();
            async move { dialer.dial().await.map_err(std::io::Error::other) }
        });
        let (mqtt, eventloop) = AsyncClient::builder(mo)
            .capacity(opts.send_queue.saturating_add(64))
            .build();
        let (connected, _) = watch::channel(false);
        let (d, m) = (&id.client.device, &id.client.module);
        let inputs_prefix = match m {
            Some(m) => format!("devices/{d}/modules/{m}/inputs/"),
            None => String::from("\u{0}no-inputs"),
        };
        let c2d_prefix = format!("devices/{d}/messages/devicebound");
        let link = Arc::new(Link {
            send_slots: Arc::new(Semaphore::new(opts.send_queue.max(1))),
            enabled: tokio::sync::Mutex::new(BTreeSet::new()),
            twin_pending: Mutex::new(HashMap::new()),
            inputs: Channel::new(opts.receive_queue),
            c2d: Channel::new(opts.receive_queue),
            desired: Channel::new(opts.receive_queue),
            method_handler: RwLock::new(None),
            method_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_METHODS)),
            connected,
            connections: std::sync::atomic::AtomicU64::new(0),
            desired_version: Mutex::new(None),
            inputs_prefix,
            c2d_prefix,
            id,
            opts,
            mqtt,
            tokens,
            tls,
        });
        let task = tokio::spawn(run(link.clone(), eventloop, expiry));
        Ok(Self { link, task })
    }
}

/// When to renew a token expiring at `expiry`: 120 s before (as the Azure SDKs
/// do), or a quarter of the lifetime before for short lifetimes.
fn renew_deadline(expiry: u64, ttl: Duration) -> Instant {
    let margin = 120u64.min(ttl.as_secs() / 4).max(1);
    let at = expiry.saturating_sub(margin);
    Instant::now() + Duration::from_secs(at.saturating_sub(unix_now()))
}

async fn renew(link: &Link, el: &mut EventLoop) -> Option<u64> {
    match link.tokens.token().await {
        Ok((token, expiry)) => {
            let user = username(&link.id.hub, &link.id.client, &link.opts.product_info);
            el.mqtt_options.set_credentials(user, token);
            tracing::debug!(client = %link.id.client, expiry, "SAS token renewed");
            Some(expiry)
        }
        Err(e) => {
            tracing::warn!(client = %link.id.client, error = %e, "cannot renew the SAS token");
            None
        }
    }
}

/// Shortest wait before the first reconnect attempt after a failed connection.
/// A module started just before its hub listens is then refused once and
/// connects on one of the first fast retries (50, 100, 200 … ms).
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Reconnect delays: fast at first (from [`FIRST_RETRY`], doubling up to
/// `reconnect_min`), then the usual exponential back-off from `reconnect_min`
/// doubling up to the `reconnect_max` cap. [`Backoff::reset`] on every CONNACK.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let mut b = Self {
            next: Duration::ZERO,
            min,
            max,
        };
        b.reset();
        b
    }

    /// Starts again from the fast first retry (after a successful connection).
    fn reset(&mut self) {
        self.next = FIRST_RETRY.min(self.min).min(self.max);
    }

    /// The delay before the next attempt; advances the sequence.
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        let doubled = d.saturating_mul(2);
        self.next = if d < self.min {
            doubled.min(self.min)
        } else {
            doubled
        }
        .min(self.max);
        d
    }
}

async fn run(link: Arc<Link>, mut el: EventLoop, mut expiry: u64) {
    let opts = &link.opts;
    let mut backoff = Backoff::new(opts.reconnect_min, opts.reconnect_max);
    let mut renew_at = renew_deadline(expiry, opts.sas_ttl);
    loop {
        tokio::select! {
            r = el.poll() => match r {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    tracing::info!(client = %link.id.client, session_present = ack.session_present, "connected");
                    link.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    link.connected.send_replace(true);
                    let l = link.clone();
                    tokio::spawn(async move { l.after_connect(ack.session_present).await });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => link.dispatch(p),
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => return,
                Err(e) => {
                    link.connected.send_replace(false);
                    let delay = backoff.next_delay();
                    tracing::warn!(client = %link.id.client, error = %e, retry_in = ?delay, "not connected");
                    let refused = matches!(
                        e,
                        ConnectionError::ConnectionRefused(
                            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
                        )
                    );
                    tokio::time::sleep(delay).await;
                    if (refused || Instant::now() >= renew_at)
                        && let Some(x) = renew(&link, &mut el).await
                    {
                        expiry = x;
                        renew_at = renew_deadline(expiry, opts.sas_ttl);
                    }
                }
            },
            () = tokio::time::sleep_until(renew_at) => {
                match renew(&link, &mut el).await {
                    Some(x) => {
                        expiry = x;
                        renew_at = renew_deadline(expiry, opts.sas_ttl);
                        // Reauthorize: drop this connection, reconnect with the new
                        // token on the same session (unacknowledged publishes are replayed).
                        el.clean();
                        link.connected.send_replace(false);
                    }
                    None => renew_at = Instant::now() + Duration::from_secs(5),
                }
            }
        }
    }
}

fn parse_query(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

impl Link {
    /// True while an MQTT connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// How many connections were established (CONNACKs accepted).
    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until connected.
    pub(crate) async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .map_err(|_| Error::Timeout("connecting"))?
            .map_err(|_| Error::Closed)?;
        Ok(())
    }

    async fn after_connect(self: Arc<Self>, session_present: bool) {
        if !session_present {
            // The server lost our session: make every enabled feature's subscription again.
            let filters: Vec<String> = self.enabled.lock().await.iter().cloned().collect();
            for f in filters {
                tracing::info!(client = %self.id.client, filter = %f, "no session on the server; subscribing again");
                if let Err(e) = self.subscribe_once(&f).await {
                    tracing::warn!(client = %self.id.client, filter = %f, error = %e, "resubscribe failed");
                }
            }
        }
        // As the Azure SDKs do: after a reconnect, fetch the twin and synthesize a
        // desired patch if the desired version moved while we were away.
        let desired_on = self.enabled.lock().await.contains(DESIRED_PATCHES);
        let known = *lock(&self.desired_version);
        if desired_on && let Some(known) = known {
            match self.get_twin().await {
                Ok(twin) => {
                    let desired = twin.get("desired").cloned().unwrap_or(Value::Null);
                    let v = desired.get("$version").and_then(Value::as_u64);
                    if v.is_some_and(|v| v != known) {
                        tracing::info!(client = %self.id.client, "desired properties changed while disconnected");
                        let _ = self.desired.tx.try_send(Delivery {
                            item: desired,
                            ack: None,
                        });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "twin refresh after reconnect failed"),
            }
        }
    }

    fn dispatch(self: &Arc<Self>, p: Publish) {
        let topic = match std::str::from_utf8(&p.topic) {
            Ok(t) => t.to_owned(),
            Err(_) => {
                tracing::warn!("publish with a non-UTF-8 topic ignored");
                let _ = self.mqtt.try_ack(&p);
                return;
            }
        };
        if let Some(rest) = topic.strip_prefix(&self.inputs_prefix) {
            let (input, bag) = rest.split_once('/').unwrap_or((rest, ""));
            match message(&p, bag) {
                Some(mut msg) => {
                    msg.system.input_name = Some(input.to_owned());
                    self.deliver(
                        &self.inputs,
                        InputMessage {
                            input: input.to_owned(),
                            message: msg,
                        },
                        p,
                    );
                }
                None => {
                    let _ = self.mqtt.try_ack(&p);
                }
            }
        } else if let Some(rest) = topic.strip_prefix(&self.c2d_prefix) {
            let bag = rest.strip_prefix('/').unwrap_or(rest);
            match message(&p, bag) {
                Some(msg) => self.deliver(&self.c2d, msg, p),
                None => {
                    let _ = self.mqtt.try_ack(&p);
                }
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let _ = self.mqtt.try_ack(&p);
            let (name, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let Some(rid) = parse_query(query)
                .find(|(k, _)| *k == "$rid")
                .map(|(_, v)| v)
            else {
                tracing::warn!(%topic, "method request without $rid ignored");
                return;
            };
            let payload = if p.payload.iter().all(u8::is_ascii_whitespace) {
                Ok(Value::Null)
            } else {
                serde_json::from_slice(&p.payload)
            };
            let this = self.clone();
            let (name, rid) = (name.to_owned(), rid.to_owned());
            match self.method_slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        this.run_method(name, rid, payload.ok()).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let body =
                            serde_json::json!({"message": "too many concurrent method calls"});
                        this.respond_method(&rid, 429, &body).await;
                    });
                }
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            let _ = self.mqtt.try_ack(&p);
            let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let mut rid = None;
            let mut version = None;
            for (k, v) in parse_query(query) {
                match k {
                    "$rid" => rid = Some(v),
                    "$version" => version = v.parse().ok(),
                    _ => {}
                }
            }
            let (Some(rid), Ok(status)) = (rid, status.parse::<u16>()) else {
                tracing::warn!(%topic, "malformed twin response ignored");
                return;
            };
            if let Some(tx) = lock(&self.twin_pending).remove(rid) {
                let _ = tx.send(TwinResponse {
                    status,
                    version,
                    body: p.payload.clone(),
                });
            }
        } else if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
            match serde_json::from_slice::<Value>(&p.payload) {
                Ok(patch) => {
                    if let Some(v) = patch.get("$version").and_then(Value::as_u64) {
                        *lock(&self.desired_version) = Some(v);
                    }
                    self.deliver(&self.desired, patch, p);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "desired patch is not JSON; ignored");
                    let _ = self.mqtt.try_ack(&p);
                }
            }
        } else {
            tracing::debug!(%topic, "publish on an unexpected topic ignored");
            let _ = self.mqtt.try_ack(&p);
        }
    }

    fn deliver<T>(&self, ch: &Channel<T>, item: T, p: Publish) {
        match ch.tx.try_send(Delivery { item, ack: Some(p) }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!(
                client = %self.id.client,
                "receive queue full: message left unacknowledged (the hub redelivers it after a reconnect)"
            ),
            Err(mpsc::error::TrySendError::Closed(d)) => {
                let _ = d.ack.map(|p| self.mqtt.try_ack(&p));
            }
        }
    }

    async fn run_method(&self, name: String, rid: String, payload: Option<Value>) {
        let Some(payload) = payload else {
            let body = serde_json::json!({"message": "method payload is not JSON"});
            return self.respond_method(&rid, 400, &body).await;
        };
        let handler = self
            .method_handler
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (status, body) = match handler {
            Some(h) => h(MethodRequest { name, payload }).await,
            None => (
                501,
                serde_json::json!({"message": format!("no handler for method {name}")}),
            ),
        };
        self.respond_method(&rid, status, &body).await;
    }

    async fn respond_method(&self, rid: &str, status: i32, body: &Value) {
        let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
        let payload = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let attempt = self.publish_acked(topic, payload);
        if tokio::time::timeout(self.opts.operation_timeout, attempt)
            .await
            .is_err()
        {
            tracing::warn!(client = %self.id.client, rid, "method response not acknowledged in time");
        }
    }

    /// Registers the method handler and enables methods.
    pub(crate) async fn set_method_handler(&self, h: MethodHandler) -> Result<(), Error> {
        *self
            .method_handler
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h);
        self.subscribe(METHODS).await
    }

    /// Publishes QoS 1 and waits for the PUBACK, sending again if the session
    /// was reset or the request was dropped before reaching the network.
    pub(crate) async fn publish_acked(&self, topic: String, payload: Bytes) -> Result<(), Error> {
        loop {
            let notice = self
                .mqtt
                .publish_tracked(
                    topic.clone(),
                    payload.clone(),
                    PublishOptions::at_least_once(),
                )
                .await
                .map_err(|e| match e {
                    rumqttc::ClientError::InvalidRequest(_) => Error::InvalidTopic(topic.clone()),
                    _ => Error::Closed,
                })?;
            match notice.wait_async().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "publish not acknowledged; sending again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A telemetry send: takes a queue slot (error when none is free), then
    /// publishes until PUBACK.
    pub(crate) async fn send_message(&self, topic: String, msg: &Message) -> Result<(), Error> {
        msg.check_size()
            .map_err(|e| Error::MessageTooLarge(e.to_string()))?;
        let permit = self
            .send_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::QueueFull)?;
        let r = self.publish_acked(topic, msg.body.clone()).await;
        drop(permit);
        r
    }

    /// Subscribes `filter` (QoS 1) unless this feature is already enabled.
    pub(crate) async fn subscribe(&self, filter: &str) -> Result<(), Error> {
        let mut enabled = self.enabled.lock().await;
        if enabled.contains(filter) {
            return Ok(());
        }
        self.subscribe_once(filter).await?;
        enabled.insert(filter.to_owned());
        Ok(())
    }

    async fn subscribe_once(&self, filter: &str) -> Result<(), Error> {
        let deadline = Instant::now() + self.opts.operation_timeout;
        loop {
            let notice = self
                .mqtt
                .subscribe_tracked(filter.to_owned(), QoS::AtLeastOnce)
                .await
                .map_err(|_| Error::Closed)?;
            match tokio::time::timeout_at(deadline, notice.wait_async()).await {
                Err(_) => return Err(Error::Timeout("SUBACK")),
                Ok(Ok(ack)) => {
                    return if ack
                        .return_codes
                        .iter()
                        .all(|c| !matches!(c, SubscribeReasonCode::Failure))
                    {
                        Ok(())
                    } else {
                        Err(Error::SubscriptionRefused(filter.to_owned()))
                    };
                }
                Ok(Err(e)) => {
                    tracing::debug!(filter, error = %e, "SUBSCRIBE not acknowledged; sending again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Sends a twin request (`{prefix}?$rid=…`) and waits for its response,
    /// trying again when a response is lost (e.g. across a reconnect).
    async fn twin_request(&self, prefix: &str, payload: Bytes) -> Result<TwinResponse, Error> {
        self.subscribe(TWIN_RESPONSES).await?;
        let deadline = Instant::now() + self.opts.operation_timeout;
        loop {
            let rid = uuid::Uuid::new_v4().to_string();
            let (tx, rx) = oneshot::channel();
            lock(&self.twin_pending).insert(rid.clone(), tx);
            let topic = format!("{prefix}?$rid={rid}");
            let attempt = async {
                self.publish_acked(topic, payload.clone()).await?;
                let wait = deadline.min(Instant::now() + Duration::from_secs(10));
                match tokio::time::timeout_at(wait, rx).await {
                    Ok(Ok(r)) => Ok(Some(r)),
                    _ => Ok(None),
                }
            };
            let r = tokio::time::timeout_at(deadline, attempt).await;
            lock(&self.twin_pending).remove(&rid);
            match r {
                Err(_) => return Err(Error::Timeout("twin response")),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(resp))) => return Ok(resp),
                Ok(Ok(None)) if Instant::now() >= deadline => {
                    return Err(Error::Timeout("twin response"));
                }
                Ok(Ok(None)) => {
                    tracing::debug!(client = %self.id.client, "no twin response yet; asking again");
                }
            }
        }
    }

    /// `{"desired": {…}, "reported": {…}}`.
    pub(crate) async fn get_twin(&self) -> Result<Value, Error> {
        let r = self
            .twin_request("$iothub/twin/GET/", Bytes::from_static(b" "))
            .await?;
        if r.status != 200 {
            return Err(Error::Service {
                status: r.status,
                message: String::from_utf8_lossy(&r.body).into_owned(),
            });
        }
        let twin: Value = serde_json::from_slice(&r.body)
            .map_err(|e| Error::Protocol(format!("twin body is not JSON: {e}")))?;
        if let Some(v) = twin
            .get("desired")
            .and_then(|d| d.get("$version"))
            .and_then(Value::as_u64)
        {
            *lock(&self.desired_version) = Some(v);
        }
        Ok(twin)
    }

    /// Patches reported properties; returns the new reported `$version`.
    pub(crate) async fn patch_reported(&self, patch: &Value) -> Result<Option<u64>, Error> {
        if !patch.is_object() {
            return Err(Error::Protocol(
                "a reported patch must be a JSON object".into(),
            ));
        }
        let body = Bytes::from(serde_json::to_vec(patch).unwrap_or_default());
        let r = self
            .twin_request("$iothub/twin/PATCH/properties/reported/", body)
            .await?;
        if r.status >= 300 {
            return Err(Error::Service {
                status: r.status,
                message: String::from_utf8_lossy(&r.body).into_owned(),
            });
        }
        Ok(r.version)
    }

    /// Lends the receiving end of `ch` out as a stream, after subscribing `filter`.
    pub(crate) async fn stream<T>(
        &self,
        ch: &Channel<T>,
        filter: &str,
        what: &'static str,
    ) -> Result<Incoming<T>, Error> {
        let rx = lock(&ch.slot).take().ok_or(Error::AlreadyReceiving(what))?;
        let stream = Incoming {
            rx: Some(rx),
            slot: ch.slot.clone(),
            mqtt: self.mqtt.clone(),
        };
        // On error the stream is dropped and the queue goes back to its slot.
        self.subscribe(filter).await?;
        Ok(stream)
    }

    /// Registers a desired-patch stream.
    pub(crate) async fn desired_patches(&self) -> Result<Incoming<Value>, Error> {
        self.stream(&self.desired, DESIRED_PATCHES, "desired patches")
            .await
    }

    /// The telemetry topic: `devices/{d}[/modules/{m}]/messages/events/{bag}`.
    pub(crate) fn events_topic(&self, msg: &Message) -> String {
        let bag = verge_core::message::encode_bag(&msg.system, &msg.properties);
        format!(
            "{}/messages/events/{bag}",
            self.id.client.resource().trim_start_matches('/')
        )
    }
}

fn message(p: &Publish, bag: &str) -> Option<Message> {
    match decode_bag(bag) {
        Ok((system, properties)) => Some(Message {
            body: p.payload.clone(),
            system,
            properties,
            ..Message::default()
        }),
        Err(e) => {
            tracing::warn!(error = %e, "message with a malformed property bag dropped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays(b: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n).map(|_| b.next_delay().as_millis() as u64).collect()
    }

    #[test]
    fn backoff_fast_first_then_doubling_to_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(
            delays(&mut b, 12),
            [
                50, 100, 200, 400, 800, 1000, 2000, 4000, 8000, 16000, 30000, 30000
            ]
        );
    }

    #[test]
    fn backoff_reset_after_connect() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        delays(&mut b, 8);
        b.reset();
        assert_eq!(delays(&mut b, 3), [50, 100, 200]);
    }

    #[test]
    fn backoff_small_min_and_max() {
        // reconnect_min below the fast first retry: start there.
        let mut b = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        assert_eq!(delays(&mut b, 7), [20, 40, 80, 160, 320, 500, 500]);
        // The cap wins over everything, even over the first retry.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_millis(30));
        assert_eq!(delays(&mut b, 3), [30, 30, 30]);
        // Zero minimum: retry at once, every time (no spin risk beyond the caller's choice).
        let mut b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(delays(&mut b, 2), [0, 0]);
    }
}
