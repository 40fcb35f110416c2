//! verge-hub: the edge hub, a local proxy of IoT Hub that modules and
//! downstream devices reach with the unchanged Azure IoT SDKs.
//!
//! # Module map
//!
//! | module | role |
//! |---|---|
//! | [`config`] | the TOML configuration (`--config`) |
//! | [`azure_env`] | run by verged without a file: the configuration from the manifest's edgeHub environment (Azure's variables) |
//! | listener ([`Hub::start`], [`tls`]) | TLS 1.2/1.3 listeners: MQTT on 8883, HTTPS on 443 |
//! | [`connection`] | the hub as a `verge_endpoint::Backend`: one MQTT 3.1.1 connection (CONNECT, keep-alive, packet loop, bounded inflight) over any byte stream |
//! | [`ws`] | MQTT over WebSocket on the HTTPS port (`/$iothub/websocket`, subprotocol `mqtt`) → [`connection`] |
//! | [`edgehub`] | the hub's configuration = its `$edgeHub` twin's desired properties; live route updates |
//! | [`session`] | (verge-endpoint's) persistent sessions (subscriptions survive reconnects and restarts), takeover |
//! | [`auth`] | the [`auth::Authenticator`] trait and SAS-token authentication (one swappable key table) |
//! | [`identity`] | edge-environment mode: module identities and the server certificate from verged, cached |
//! | [`identity_scope`] | child devices of this edge from the cloud's device scope, cached |
//! | [`topic`] | (verge-endpoint's) topic classification, filter matching, per-identity authorization |
//! | [`router`] | router glue: stamp a message, route it (`verge-route`), store it (`verge-store`) |
//! | [`delivery`] | one pump per module-input endpoint: store → module, checkpoint on PUBACK |
//! | [`clients`] | the `clients` section of the `$edgeHub` twin's reported properties: who is connected, since when |
//! | [`twins`] | twins kept and persisted by the hub (with their queue of reported patches for the cloud); local desired-properties source |
//! | [`upstream`] | the cloud link: one MQTT connection per identity; drains `$upstream` (checkpoint on PUBACK), syncs twins (reported queue, desired patches and diff on reconnect), relays cloud methods and C2D |
//! | [`methods`] | HTTPS API: direct methods relayed to the target's MQTT connection; `PUT /edgehub/desired` |
//!
//! # Data path of a message
//!
//! 1. A module publishes QoS 1 on `devices/{d}/modules/{m}/messages/events/{bag}`.
//! 2. [`connection`] checks the topic is in the client's namespace ([`topic::classify`]).
//! 3. [`router`] decodes the bag, stamps `connectionDeviceId`,
//!    `connectionModuleId`, `enqueuedTime` and a message id, evaluates the
//!    route set and queues the message to the store (in call order) with one
//!    target per matched endpoint (priority, TTL). Unrouted messages are
//!    dropped and counted. Up to 64 appends per connection are in flight.
//! 4. Only after an append is durable does the connection send its PUBACK,
//!    in packet order.
//! 5. The [`delivery`] pump of each `modules/{m}/inputs/{i}` endpoint is woken
//!    and — once module `m` is connected and subscribed to
//!    `devices/{d}/modules/{m}/inputs/#` — keeps a window of deliveries in
//!    flight on `devices/{d}/modules/{m}/inputs/{i}/{bag}` (bag with
//!    `$.cdid`/`$.cmid`).
//! 6. The pump checkpoints the PUBACKed prefix in the background; if the
//!    module goes away first, it rewinds to the checkpoint and redelivers.
//!    `$upstream` messages are drained by [`upstream`] to the cloud
//!    (configured by `[upstream]`), one connection per sender, checkpointed
//!    after the cloud's PUBACK.

mod amqp;
pub mod auth;
pub mod azure_env;
pub mod cli;
pub mod clients;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod edgehub;
pub mod identity;
pub mod identity_scope;
pub mod methods;
pub mod metrics;
pub mod router;
pub use verge_endpoint::session;
pub mod tls;
pub use verge_endpoint::topic;
pub mod twins;
pub mod upstream;
pub mod ws;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use verge_route::{Endpoint, RouteSet};
use verge_store::{Store, StoreConfig};

use crate::auth::{Authenticator, SasAuthenticator};
use crate::config::Config;
use crate::session::Sessions;
use crate::twins::Twins;

pub use crate::edgehub::ConfigUpdateError;

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Telemetry dropped because no route matched.
    pub dropped_no_route: AtomicU64,
    /// Messages stored.
    pub stored: AtomicU64,
    /// Telemetry refused at ingest (not acknowledged): bad property bag,
    /// too large, or a delivery topic that would not encode.
    pub refused: AtomicU64,
    /// Stored deliveries dropped because they cannot be sent (a topic past
    /// MQTT's limit, stored before ingest refused such messages); each is
    /// checkpointed past, never retried.
    pub dead_lettered: AtomicU64,
    /// Messages delivered to module inputs.
    pub delivered: AtomicU64,
    /// The cloud link: messages sent, TTL drops, link states.
    pub upstream: upstream::UpstreamStats,
}

type MethodKey = (String, String);
type MethodReply = oneshot::Sender<(i64, Bytes)>;

/// State shared by every task of a running hub.
pub struct HubState {
    /// The configuration.
    pub cfg: Config,
    /// MQTT authenticator.
    pub auth: Arc<dyn Authenticator>,
    /// SAS checks for HTTP callers.
    pub sas: Arc<SasAuthenticator>,
    /// Sessions.
    pub sessions: Arc<Sessions>,
    /// Message store.
    pub store: Store,
    routes: RwLock<Arc<edgehub::ActiveRoutes>>,
    pumps_wanted: Mutex<BTreeSet<(String, String)>>,
    pumps_changed: Notify,
    config_update: tokio::sync::Mutex<()>,
    /// The hub's shutdown: its token ends every loop (WebSocket connections,
    /// spawned by the HTTP upgrade, included); its tracker holds the tasks.
    shutdown: verge_shutdown::Shutdown,
    /// Twins.
    pub twins: Twins,
    /// Counters.
    pub stats: Stats,
    /// Connection status of clients, for the `$edgeHub` twin.
    pub clients: clients::ClientStatus,
    /// Prometheus series ([`metrics`]).
    pub metrics: metrics::HubMetrics,
    endpoint_notify: Mutex<HashMap<String, Arc<Notify>>>,
    pending_methods: Mutex<HashMap<MethodKey, MethodReply>>,
    next_id: AtomicU64,
}

/// Locks `m`; a panic elsewhere while it was held leaves data that is still
/// consistent for every use in this crate, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HubState {
    /// The route set in force (replaced live by [`HubState::apply_edgehub_desired`]).
    pub fn routes(&self) -> Arc<edgehub::ActiveRoutes> {
        self.routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `routes` in force (after making sure every module-input endpoint
    /// it names has a delivery pump). Callers validate first; see [`edgehub`].
    fn install_routes(&self, routes: edgehub::ActiveRoutes) {
        self.want_pumps(&routes.set);
        // `storeLimits.maxSizeBytes`: beyond it appends are refused ("storage full").
        self.store.set_max_bytes(routes.max_size_bytes);
        *self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(routes);
    }

    fn want_pumps(&self, routes: &RouteSet) {
        let mut added = false;
        {
            let mut wanted = lock(&self.pumps_wanted);
            for ep in routes.endpoints() {
                if let Endpoint::ModuleInput { module, input } = ep {
                    added |= wanted.insert((module.clone(), input.clone()));
                }
            }
        }
        if added {
            self.pumps_changed.notify_one();
        }
    }

    /// Completes once the hub is shutting down.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// The hub's shutdown (token and task tracker).
    pub fn shutdown(&self) -> &verge_shutdown::Shutdown {
        &self.shutdown
    }

    /// A process-unique number (connection ids, method request ids).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The wake-up signal of an endpoint's delivery pump.
    pub fn endpoint_notify(&self, endpoint: &str) -> Arc<Notify> {
        let mut map = lock(&self.endpoint_notify);
        // Looked up per routed message: no key allocation once it exists.
        if let Some(n) = map.get(endpoint) {
            return n.clone();
        }
        map.entry(endpoint.to_owned()).or_default().clone()
    }

    fn register_method(&self, target: &str, rid: &str, tx: MethodReply) {
        lock(&self.pending_methods).insert((target.to_owned(), rid.to_owned()), tx);
    }

    fn forget_method(&self, target: &str, rid: &str) {
        lock(&self.pending_methods).remove(&(target.to_owned(), rid.to_owned()));
    }

    /// Hands a callee's method response to the waiting HTTP request.
    pub fn complete_method(&self, callee: &str, rid: &str, status: i64, payload: Bytes) {
        let tx = lock(&self.pending_methods).remove(&(callee.to_owned(), rid.to_owned()));
        match tx {
            Some(tx) => {
                let _ = tx.send((status, payload));
            }
            None => tracing::debug!(callee, rid, "method response for no pending request"),
        }
    }
}

/// A running hub.
pub struct Hub {
    /// Shared state (for tests and embedding).
    pub state: Arc<HubState>,
    /// Bound MQTT address.
    pub mqtt_addr: SocketAddr,
    /// Bound HTTPS address.
    pub https_addr: SocketAddr,
    /// The MQTT and HTTPS listeners' counters.
    listener_stats: [Arc<verge_listen::Stats>; 2],
    /// Bound metrics address (`None`: disabled, or the port was taken).
    pub metrics_addr: Option<SocketAddr>,
}

/// How long [`Hub::shutdown`] waits for the hub's tasks (verged and Docker
/// allow 10 s between SIGTERM and SIGKILL; the rest is for flushing).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs one delivery pump per wanted module-input endpoint, starting new
/// pumps as routes add endpoints. Pumps of endpoints no route names any more
/// keep running, so messages already stored for them are still delivered.
/// A pump that ends (it only can by panicking) is started again.
async fn pump_supervisor(state: Arc<HubState>) {
    let mut running: HashMap<tokio::task::Id, (String, String)> = HashMap::new();
    let mut pumps = JoinSet::new();
    loop {
        let wanted: Vec<(String, String)> = lock(&state.pumps_wanted)
            .iter()
            .filter(|k| !running.values().any(|r| r == *k))
            .cloned()
            .collect();
        for (module, input) in wanted {
            tracing::info!(%module, %input, "starting the delivery pump");
            let task = pumps.spawn(delivery::run(state.clone(), module.clone(), input.clone()));
            running.insert(task.id(), (module, input));
        }
        tokio::select! {
            () = state.pumps_changed.notified() => {}
            Some(ended) = pumps.join_next_with_id(), if !pumps.is_empty() => {
                let id = match &ended {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                if let Some((module, input)) = running.remove(&id) {
                    tracing::error!(%module, %input, "delivery pump ended; restarting it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Installs the ring crypto provider (once per process).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl HubState {
    /// Opens the storage directory (store, sessions, twins) and puts the
    /// initial configuration in force, without binding or starting anything
    /// but the sessions' persister (a task of the hub's shutdown). [`Hub::start`] uses it; so do harnesses
    /// that drive [`connection::serve`] directly (the fuzz target).
    pub async fn open(cfg: Config) -> anyhow::Result<Arc<Self>> {
        Ok(open_state(cfg).await?.0)
    }
}

/// Opens the message store. A store whose files are damaged (a table
/// deleted, a corrupt manifest: [`verge_store::StoreError::is_damage`]) will
/// not open by retrying, and exiting would only have the hub restarted into
/// the same error: it is moved aside (nothing deleted) and an empty store
/// starts in its place, with an error naming both directories. `salvage`
/// (`--salvage`) does the same for any failure to open.
async fn open_store(
    dir: std::path::PathBuf,
    config: StoreConfig,
    salvage: bool,
) -> anyhow::Result<Store> {
    let first = {
        let (dir, config) = (dir.clone(), config.clone());
        tokio::task::spawn_blocking(move || Store::open(dir, config)).await?
    };
    let e = match first {
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    if !(salvage || e.is_damage()) {
        return Err(anyhow::anyhow!(
            "cannot open the message store {}: {e}. If its files are damaged, start \
             verge-hub once with --salvage (or VERGE_HUB_SALVAGE=1): the store is moved \
             aside to {}.damaged-<time> and an empty one started",
            dir.display(),
            dir.display()
        ));
    }
    let moved = verge_store::move_aside(&dir)
        .with_context(|| format!("moving the damaged store {} aside", dir.display()))?;
    tracing::error!(
        store = %dir.display(),
        moved_to = %moved.display(),
        error = %e,
        "the message store could not be opened; it was moved aside and an empty store \
         started (messages not yet delivered are in the moved copy)"
    );
    tokio::task::spawn_blocking(move || Store::open(dir, config))
        .await?
        .map_err(Into::into)
}

/// [`HubState::open`], also returning the routes file's content as applied.
async fn open_state(cfg: Config) -> anyhow::Result<(Arc<HubState>, Option<Vec<u8>>)> {
    // Messages, twins and session state are the clients' data: owner only
    // (the store creates its files inside a directory nobody else can enter).
    let store_dir = cfg.storage_dir.join("store");
    {
        let dirs = [cfg.storage_dir.clone(), store_dir.clone()];
        tokio::task::spawn_blocking(move || {
            dirs.iter()
                .try_for_each(|d| verge_files::create_private_dir(d))
        })
        .await??;
    }
    let sas = Arc::new(SasAuthenticator::from_config(&cfg)?);
    // TTLs come from the routes and the `$edgeHub` configuration (which can
    // say "never expire"), so the store adds no default of its own.
    let store_cfg = StoreConfig {
        default_ttl_secs: None,
        min_free_bytes: cfg.store.min_free_bytes,
        min_free_percent: cfg.store.min_free_percent,
        ..StoreConfig::default()
    };
    let store = open_store(store_dir, store_cfg, cfg.salvage_store).await?;
    let shutdown = verge_shutdown::Shutdown::new();
    let sessions = Sessions::open(cfg.storage_dir.join("sessions"), &shutdown).await?;
    let twins = Twins::open(cfg.storage_dir.join("twins")).await?;
    if cfg.upstream.is_some() {
        // Reported patches of every identity the hub holds keys for at the
        // time (config, verged's module identities, the cloud's device
        // scope) are queued for the cloud.
        let keys = sas.clone();
        twins.sync_upstream_when(Arc::new(move |id| {
            id.parse::<verge_core::ClientId>()
                .is_ok_and(|c| keys.key_for(&c).is_some())
        }));
    }

    // Module-input endpoints with queues left in the store get a pump even if
    // no route names them any more, so their messages are still delivered.
    let mut endpoints: BTreeSet<(String, String)> = BTreeSet::new();
    for q in store.queues().await? {
        if let Some(Endpoint::ModuleInput { module, input }) =
            Endpoint::from_brokered_path(&q.endpoint)
        {
            endpoints.insert((module, input));
        }
    }

    // The initial `$edgeHub` desired properties: the routes file when there is
    // one (a bad file is a configuration error), else the last accepted
    // document, kept in the `$edgeHub` twin.
    let routes_file = match &cfg.routes_file {
        Some(path) => {
            let bytes = tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            let (value, _) =
                edgehub::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some((bytes, value))
        }
        None => None,
    };

    let state = Arc::new(HubState {
        auth: sas.clone(),
        sas,
        sessions,
        store,
        routes: RwLock::new(Arc::new(edgehub::ActiveRoutes::default())),
        pumps_wanted: Mutex::new(endpoints),
        pumps_changed: Notify::new(),
        config_update: tokio::sync::Mutex::new(()),
        shutdown,
        twins,
        stats: Stats::default(),
        clients: clients::ClientStatus::default(),
        metrics: metrics::HubMetrics::new(&cfg.iothub_hostname, &cfg.device_id),
        endpoint_notify: Mutex::new(HashMap::new()),
        pending_methods: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        cfg,
    });
    let initial = match &routes_file {
        Some((_, value)) => Some(value.clone()),
        None => state
            .twins
            .desired(&state.edgehub_twin_id())
            .filter(|m| !m.is_empty())
            .map(serde_json::Value::Object),
    };
    if let Some(value) = initial
        && let Err(e) = state.set_edgehub_desired(&value).await
    {
        match &state.cfg.routes_file {
            Some(path) => anyhow::bail!("{}: {e}", path.display()),
            None => match state.restore_last_accepted().await {
                Some(routes) => {
                    tracing::error!(error = %e, routes, "the saved $edgeHub configuration is refused; the last accepted routes are in force");
                }
                None => {
                    tracing::error!(error = %e, "the saved $edgeHub configuration is refused; starting with no routes");
                }
            },
        }
    }
    Ok((state, routes_file.map(|(bytes, _)| bytes)))
}

impl Hub {
    /// Opens storage, binds the listeners and starts every task.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        install_crypto_provider();
        cfg.check_sources().map_err(|e| anyhow::anyhow!(e))?;
        // Config-file certificate now (a bad file fails before anything opens).
        let file_tls = match &cfg.tls {
            Some(t) => Some(tls::acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let (state, routes_bytes) = open_state(cfg).await?;
        let (edge_tls, identity_tasks) = identity::prepare(&state).await?;
        let scope_tasks = identity_scope::prepare(&state).await?;
        let tls = file_tls
            .or(edge_tls)
            .context("no TLS server certificate source")?;
        let mqtt = TcpListener::bind(state.cfg.listen.mqtt)
            .await
            .with_context(|| format!("binding MQTT {}", state.cfg.listen.mqtt))?;
        let https = TcpListener::bind(state.cfg.listen.https)
            .await
            .with_context(|| format!("binding HTTPS {}", state.cfg.listen.https))?;
        let amqps = match state.cfg.listen.amqps {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding AMQPS {a}"))?,
            ),
            None => None,
        };
        let mqtt_addr = mqtt.local_addr()?;
        let https_addr = https.local_addr()?;

        // The hub's loops hold nothing to flush (the store and the sessions
        // do it themselves): they end at the shutdown's first await point.
        let sd = state.shutdown.clone();
        sd.spawn_until_cancelled("delivery pumps", pump_supervisor(state.clone()));
        let st = state.clone();
        sd.spawn_until_cancelled(
            "$edgeHub clients report",
            async move { clients::run(&st).await },
        );
        for (i, t) in identity_tasks.into_iter().chain(scope_tasks).enumerate() {
            sd.spawn_until_cancelled(format!("identity refresh {i}"), t);
        }
        if let Some(up) = upstream::Upstream::prepare(&state.cfg)? {
            sd.spawn_until_cancelled("upstream", up.run(state.clone()));
        }
        if let Some(path) = state.cfg.routes_file.clone() {
            sd.spawn_until_cancelled(
                "routes file watch",
                edgehub::watch_routes_file(state.clone(), path, routes_bytes),
            );
        }
        if let Some(path) = state.cfg.twins_file.clone() {
            sd.spawn_until_cancelled(
                "twins file watch",
                twins::run_desired_source(state.clone(), path),
            );
        }
        let metrics_addr = start_metrics(&state).await?;
        let (mqtt_caps, https_caps) = state.cfg.limits.connection_caps();
        // The listeners stop accepting on the hub's shutdown.
        let cancel = sd.token();
        let mqtt = verge_listen::Listener::new("mqtt", mqtt, mqtt_caps, cancel.clone());
        if let Some(amqps) = amqps {
            tracing::info!(amqps_addr = %amqps.local_addr()?, "AMQPS listening");
            // AMQP clients are devices and modules like MQTT's: the same caps.
            let amqps = verge_listen::Listener::new("amqps", amqps, mqtt_caps, cancel.clone());
            sd.spawn_until_cancelled(
                "AMQPS listener",
                amqp::listener(state.clone(), amqps, tls.clone()),
            );
        }
        let https = verge_listen::Listener::new("https", https, https_caps, cancel);
        let listener_stats = [mqtt.stats(), https.stats()];
        sd.spawn_until_cancelled(
            "MQTT listener",
            mqtt_listener(state.clone(), mqtt, tls.clone()),
        );
        sd.spawn_until_cancelled("HTTPS listener", https_listener(state.clone(), https, tls));
        tracing::info!(%mqtt_addr, %https_addr, "verge-hub listening");
        Ok(Self {
            state,
            mqtt_addr,
            https_addr,
            listener_stats,
            metrics_addr,
        })
    }

    /// Stops every task (waiting up to [`SHUTDOWN_GRACE`]), then writes the
    /// sessions left unwritten. Returns the names of tasks that outlived
    /// the grace period (logged).
    pub async fn shutdown(self) -> Vec<String> {
        let left = self.state.shutdown.finish(SHUTDOWN_GRACE).await;
        if let Err(e) = self.state.sessions.flush().await {
            tracing::error!(error = %e, "cannot persist sessions");
        }
        tracing::info!("verge-hub stopped");
        left
    }

    /// The MQTT and HTTPS listeners' counters (accepted, refused, timed out, open).
    pub fn listener_stats(&self) -> (&verge_listen::Stats, &verge_listen::Stats) {
        let [mqtt, https] = &self.listener_stats;
        (mqtt, https)
    }

    /// Waits until a task ends before the shutdown (which only happens on a
    /// fatal error); yields its name.
    pub async fn wait(&self) -> String {
        self.state.shutdown.task_ended_early().await
    }
}

/// Binds and starts the metrics endpoint. Bad settings are configuration
/// errors; a port already taken is logged and the hub runs without metrics
/// (they are for watching the hub, which must route messages regardless).
async fn start_metrics(state: &Arc<HubState>) -> anyhow::Result<Option<SocketAddr>> {
    let settings = metrics::settings(&state.cfg).map_err(|e| anyhow::anyhow!(e))?;
    match verge_metrics::bind(&settings).await {
        Ok(Some(bound)) => {
            let addr = bound.local_addr()?;
            let source = Arc::new(metrics::Source(state.clone()));
            state.shutdown.spawn_until_cancelled(
                "metrics listener",
                verge_metrics::serve(bound, source, state.shutdown.clone()),
            );
            tracing::info!(%addr, path = %settings.suffix, "serving metrics");
            Ok(Some(addr))
        }
        Ok(None) => {
            state.metrics.stop_per_message();
            Ok(None)
        }
        Err(e) => {
            tracing::error!(addr = %settings.addr, error = %e, "cannot bind the metrics listener; running without metrics");
            state.metrics.stop_per_message();
            Ok(None)
        }
    }
}

async fn mqtt_listener(
    state: Arc<HubState>,
    listener: verge_listen::Listener<TcpListener>,
    tls: tokio_rustls::TlsAcceptor,
) {
    listener
        .run(
            move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
                let (state, tls) = (state.clone(), tls.clone());
                async move {
                    let _ = tcp.set_nodelay(true);
                    let peer = conn.peer().to_string();
                    match conn.handshake(tls.accept(tcp)).await {
                        Some(Ok(stream)) => tokio::select! {
                            () = connection::serve_with_certs(state, tls::client_certs(&stream), stream, peer, verge_endpoint::session::Transport::Mqtt) => {}
                            () = conn.cancelled() => {}
                        },
                        Some(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        None => {}
                    }
                }
            },
        )
        .await;
}

async fn https_listener(
    state: Arc<HubState>,
    listener: verge_listen::Listener<TcpListener>,
    tls: tokio_rustls::TlsAcceptor,
) {
    let app = methods::router(state.clone());
    let timeouts = state.cfg.limits.http_timeouts();
    listener
        .run(
            move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
                let (app, tls) = (app.clone(), tls.clone());
                async move {
                    let Some(peer) = conn.peer().socket_addr() else {
                        return;
                    };
                    let stream = match conn.handshake(tls.accept(tcp)).await {
                        Some(Ok(s)) => s,
                        Some(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        None => return,
                    };
                    let certs = tls::client_certs(&stream);
                    // A client certificate reaches MQTT over WebSocket (X.509).
                    let app = if certs.is_empty() {
                        app
                    } else {
                        app.layer(axum::Extension(ws::ClientCerts(Arc::new(certs))))
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    // Upgrades are served: MQTT over WebSocket takes the connection over.
                    verge_listen::http::serve(stream, svc, methods::Peer(peer), timeouts, &conn)
                        .await;
                }
            },
        )
        .await;
}
