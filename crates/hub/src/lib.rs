//! verge-hub: the edge hub, a local proxy of IoT Hub that modules and
//! downstream devices reach with the unchanged Azure IoT SDKs.
//!
//! # Module map
//!
//! | module | role |
//! |---|---|
//! | [`config`] | the TOML configuration (`--config`) |
//! | listener ([`Hub::start`], [`tls`]) | TLS 1.2/1.3 listeners: MQTT on 8883, HTTPS on 443 |
//! | [`connection`] | one MQTT 3.1.1 connection: CONNECT, keep-alive, packet loop, bounded inflight |
//! | [`session`] | persistent sessions (subscriptions survive reconnects and restarts), takeover |
//! | [`auth`] | the [`auth::Authenticator`] trait and SAS-token authentication |
//! | [`topic`] | topic classification, filter matching, per-identity authorization |
//! | [`router`] | router glue: stamp a message, route it (`verge-route`), store it (`verge-store`) |
//! | [`delivery`] | one pump per module-input endpoint: store → module, checkpoint on PUBACK |
//! | [`twins`] | twins kept and persisted by the hub; local desired-properties source |
//! | [`methods`] | HTTPS direct-method API relayed to the target's MQTT connection |
//!
//! # Data path of a message
//!
//! 1. A module publishes QoS 1 on `devices/{d}/modules/{m}/messages/events/{bag}`.
//! 2. [`connection`] checks the topic is in the client's namespace ([`topic::classify`]).
//! 3. [`router::ingest`] decodes the bag, stamps `connectionDeviceId`,
//!    `connectionModuleId`, `enqueuedTime` and a message id, evaluates the
//!    route set and appends the message to the store with one target per
//!    matched endpoint (priority, TTL). Unrouted messages are dropped and counted.
//! 4. Only after the append is durable does the connection send PUBACK.
//! 5. The [`delivery`] pump of each `modules/{m}/inputs/{i}` endpoint is woken,
//!    reads a batch, and — once module `m` is connected and subscribed to
//!    `devices/{d}/modules/{m}/inputs/#` — publishes each message QoS 1 on
//!    `devices/{d}/modules/{m}/inputs/{i}/{bag}` (bag with `$.cdid`/`$.cmid`).
//! 6. When the module has PUBACKed the batch, the pump checkpoints the store;
//!    if the module goes away first, the pump rewinds and redelivers later.
//!    `$upstream` messages stay in the store until the cloud link exists.

pub mod auth;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod methods;
pub mod router;
pub mod session;
pub mod tls;
pub mod topic;
pub mod twins;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use verge_core::manifest::EdgeHubDesired;
use verge_route::{Endpoint, RouteSet};
use verge_store::{Store, StoreConfig};

use crate::auth::{Authenticator, SasAuthenticator};
use crate::config::Config;
use crate::session::Sessions;
use crate::twins::Twins;

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Telemetry dropped because no route matched.
    pub dropped_no_route: AtomicU64,
    /// Messages stored.
    pub stored: AtomicU64,
    /// Messages delivered to module inputs.
    pub delivered: AtomicU64,
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
    /// Compiled routes.
    pub routes: Arc<RouteSet>,
    /// Twins.
    pub twins: Twins,
    /// Counters.
    pub stats: Stats,
    endpoint_notify: Mutex<HashMap<String, Arc<Notify>>>,
    pending_methods: Mutex<HashMap<MethodKey, MethodReply>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HubState {
    /// A process-unique number (connection ids, method request ids).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The wake-up signal of an endpoint's delivery pump.
    pub fn endpoint_notify(&self, endpoint: &str) -> Arc<Notify> {
        lock(&self.endpoint_notify)
            .entry(endpoint.to_owned())
            .or_default()
            .clone()
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
    tasks: JoinSet<()>,
}

/// Reads the routes file (`$edgeHub` desired properties, JSON).
pub fn load_routes(cfg: &Config) -> anyhow::Result<RouteSet> {
    let Some(path) = &cfg.routes_file else {
        return Ok(RouteSet::default());
    };
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let desired = EdgeHubDesired::from_value(&value)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    RouteSet::new(&desired.routes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Installs the aws-lc-rs crypto provider (once per process).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl Hub {
    /// Opens storage, binds the listeners and starts every task.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        install_crypto_provider();
        tokio::fs::create_dir_all(&cfg.storage_dir)
            .await
            .with_context(|| format!("creating {}", cfg.storage_dir.display()))?;
        let tls = tls::acceptor(&cfg.tls.cert, &cfg.tls.key)?;
        let routes = Arc::new(load_routes(&cfg)?);
        let sas = Arc::new(SasAuthenticator::from_config(&cfg)?);
        let store_dir = cfg.storage_dir.join("store");
        let store =
            tokio::task::spawn_blocking(move || Store::open(store_dir, StoreConfig::default()))
                .await??;
        let sessions = Sessions::open(cfg.storage_dir.join("sessions.json")).await?;
        let twins = Twins::open(cfg.storage_dir.join("twins.json")).await?;
        let mqtt = TcpListener::bind(cfg.listen.mqtt)
            .await
            .with_context(|| format!("binding MQTT {}", cfg.listen.mqtt))?;
        let https = TcpListener::bind(cfg.listen.https)
            .await
            .with_context(|| format!("binding HTTPS {}", cfg.listen.https))?;
        let mqtt_addr = mqtt.local_addr()?;
        let https_addr = https.local_addr()?;

        // Every module-input endpoint: from the routes and from queues left in the store.
        let mut endpoints: BTreeSet<(String, String)> = BTreeSet::new();
        for ep in routes.endpoints() {
            if let Endpoint::ModuleInput { module, input } = ep {
                endpoints.insert((module.clone(), input.clone()));
            }
        }
        for q in store.queues().await? {
            if let Some(Endpoint::ModuleInput { module, input }) =
                Endpoint::from_brokered_path(&q.endpoint)
            {
                endpoints.insert((module, input));
            }
        }

        let state = Arc::new(HubState {
            auth: sas.clone(),
            sas,
            sessions,
            store,
            routes,
            twins,
            stats: Stats::default(),
            endpoint_notify: Mutex::new(HashMap::new()),
            pending_methods: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            cfg,
        });
        let mut tasks = JoinSet::new();
        for (module, input) in endpoints {
            tasks.spawn(delivery::run(state.clone(), module, input));
        }
        if let Some(path) = state.cfg.twins_file.clone() {
            tasks.spawn(twins::run_desired_source(state.clone(), path));
        }
        tasks.spawn(mqtt_listener(state.clone(), mqtt, tls.clone()));
        tasks.spawn(https_listener(state.clone(), https, tls));
        tracing::info!(%mqtt_addr, %https_addr, "verge-hub listening");
        Ok(Self {
            state,
            mqtt_addr,
            https_addr,
            tasks,
        })
    }

    /// Stops every task, flushes the sessions and closes the store.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Err(e) = self.state.sessions.flush().await {
            tracing::error!(error = %e, "cannot persist sessions");
        }
    }

    /// Waits until a task ends (which only happens on a fatal error).
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}

async fn mqtt_listener(
    state: Arc<HubState>,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
) {
    let mut conns = JoinSet::new();
    let handshake = Duration::from_secs(state.cfg.limits.connect_timeout_secs);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let state = state.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tokio::time::timeout(handshake, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => connection::serve(state, stream, peer.to_string()).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn https_listener(
    state: Arc<HubState>,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
) {
    let app = methods::router(state.clone());
    let mut conns = JoinSet::new();
    let handshake = Duration::from_secs(state.cfg.limits.connect_timeout_secs);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let tls = tls.clone();
                let app = app.clone();
                conns.spawn(async move {
                    let stream = match tokio::time::timeout(handshake, tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
