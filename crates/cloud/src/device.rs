//! The device endpoint: IoT Hub's MQTT dialect over TLS, served by
//! verge-endpoint (the same connection code as the edge hub) with
//! [`CloudState`] behind it.
//!
//! * CONNECT: a SAS token → [`CloudState::verify_device_client`] (the
//!   identity's own token, or its parent edge's on its behalf); an empty
//!   password with a TLS client certificate → [`CloudState::verify_device_cert`]
//!   (`selfSigned` thumbprints or `certificateAuthority` chains to a verified
//!   CA, [`crate::certs`]). Unknown, disabled, bad or expired → CONNACK 5,
//!   the reason logged. Then [`CloudState::connect`]; the registration is
//!   dropped, marking the identity disconnected, when the connection ends.
//! * Telemetry → [`CloudState::ingest_submit`], several in flight per
//!   connection in order (PUBACK after the D2C log's fsync of each);
//!   twin GET and reported PATCH → the registry's twins; method answers →
//!   [`CloudState::method_response`].
//! * Each connection's [`ConnectionEvent`]s are pumped to the client by one
//!   task: methods on `$iothub/methods/POST/{name}/?$rid={rid}`, desired
//!   patches on `$iothub/twin/PATCH/properties/desired/?$version={v}`, C2D
//!   (devices only) pulled with [`CloudState::c2d_next`] and published on
//!   `devices/{d}/messages/devicebound/{bag}`, completed on PUBACK.
//!   `Resync` re-sends the full desired document and polls C2D again.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use verge_core::ClientId;
use verge_core::message::{Message, MessageKind, decode_bag, encode_bag};
use verge_endpoint::auth::{AuthError, Credentials, check_username};
use verge_endpoint::session::{ConnHandle, Outbound, Sessions};
use verge_endpoint::{Backend, Limits, Rejection};

use crate::d2c::D2cReceipt;
use crate::{
    C2dDelivery, CloudError, CloudState, Connection, ConnectionEvent, MethodResponse, Settlement,
};

/// How long a pushed event may wait for room in a slow client's queue.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// [`CloudState`] behind the MQTT endpoint.
pub struct CloudBackend {
    cloud: CloudState,
    sessions: Arc<Sessions>,
    limits: Limits,
    /// The provisioning service sharing this port, once set ([`crate::dps`]).
    dps: std::sync::OnceLock<Arc<crate::dps::Dps>>,
}

impl CloudBackend {
    /// A backend over `cloud`, keeping MQTT sessions (subscriptions of
    /// clean_session=0 clients) next to `sessions_file` (in the directory of
    /// that name without `.json`; see [`Sessions`]), with a persister no
    /// shutdown waits for (tests and benchmarks).
    pub async fn open(cloud: CloudState, sessions_file: PathBuf) -> anyhow::Result<Arc<Self>> {
        Self::open_with(
            cloud,
            sessions_file.with_extension(""),
            &verge_shutdown::Shutdown::new(),
        )
        .await
    }

    /// A backend over `cloud`, keeping MQTT sessions in `sessions_dir`; the
    /// sessions' persister is a task of `shutdown`.
    pub async fn open_with(
        cloud: CloudState,
        sessions_dir: PathBuf,
        shutdown: &verge_shutdown::Shutdown,
    ) -> anyhow::Result<Arc<Self>> {
        let sessions = Sessions::open(sessions_dir, shutdown).await?;
        Ok(Arc::new(Self {
            cloud,
            sessions,
            limits: Limits {
                connect_timeout: Duration::from_secs(30),
                max_inflight: 32,
                // IoT Hub's 256 KiB message limit plus room for topic and header.
                max_packet_bytes: 256 * 1024 + 8 * 1024,
            },
            dps: std::sync::OnceLock::new(),
        }))
    }

    /// Serves DPS's MQTT on this port too (set once; later calls are ignored).
    pub fn set_dps(&self, dps: Arc<crate::dps::Dps>) {
        let _ = self.dps.set(dps);
    }

    /// The provisioning service, if set.
    pub fn dps(&self) -> Option<Arc<crate::dps::Dps>> {
        self.dps.get().cloned()
    }

    /// The cloud state.
    pub fn cloud(&self) -> &CloudState {
        &self.cloud
    }
}

fn rejection(e: &CloudError) -> Rejection {
    Rejection::new(e.status(), e.to_string())
}

/// The per-connection event pump; aborted (dropping the cloud
/// registration it owns) when the connection ends.
pub struct Link(JoinHandle<()>);

impl Drop for Link {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Backend for CloudBackend {
    type Link = Link;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError> {
        if let Some(username) = creds.username {
            check_username(username, creds.client_id)?;
        }
        // A certificate and no password: X.509 (a password keeps SAS).
        if creds.wants_x509() {
            return self
                .cloud
                .verify_device_cert(creds.client_id, creds.client_certs)
                .map_err(|e| AuthError::Refused(e.to_string()));
        }
        let password = creds.password.ok_or(AuthError::NoCredentials)?;
        let token = std::str::from_utf8(password).map_err(|_| AuthError::NotUtf8)?;
        self.cloud
            .verify_device_client(creds.client_id, token)
            .map_err(|e| AuthError::Refused(e.to_string()))
    }

    async fn connected(&self, client: &ClientId, conn: &ConnHandle) -> Result<Link, Rejection> {
        let registration = self
            .cloud
            .connect(client, conn.transport)
            .map_err(|e| rejection(&e))?;
        let pump = Pump {
            cloud: self.cloud.clone(),
            sessions: self.sessions.clone(),
            client_id: client.to_string(),
            conn: conn.clone(),
            acks: JoinSet::new(),
        };
        Ok(Link(tokio::spawn(pump.run(registration))))
    }

    // Submission stamps the message and queues it for the D2C log's writer
    // (in call order, so one connection's messages keep their order); the
    // wait resolves after the fsync that made it durable, so the PUBACK
    // still follows the disk while a connection's window of messages
    // shares group commits.
    type Pending = D2cReceipt;

    async fn telemetry_submit(
        &self,
        client: &ClientId,
        bag: &str,
        payload: Bytes,
    ) -> Result<D2cReceipt, Rejection> {
        let (mut system, properties) =
            decode_bag(bag).map_err(|e| Rejection::bad_request(e.to_string()))?;
        // A device has no outputs; nobody may claim an input.
        if client.module.is_none() {
            system.output_name = None;
        }
        system.input_name = None;
        let message = Message {
            kind: MessageKind::Telemetry,
            body: payload,
            system,
            properties,
        };
        self.cloud
            .ingest_submit(client, message)
            .await
            .map_err(|e| rejection(&e))
    }

    async fn telemetry_wait(&self, pending: &mut D2cReceipt) -> Result<(), Rejection> {
        pending.wait().await.map(|_| ()).map_err(|e| rejection(&e))
    }

    async fn twin_get(&self, client: &ClientId) -> Result<Value, Rejection> {
        self.cloud
            .get_twin(client)
            .map(|t| t.twin.to_client_json())
            .map_err(|e| rejection(&e))
    }

    async fn twin_patch_reported(&self, client: &ClientId, patch: Value) -> Result<u64, Rejection> {
        self.cloud
            .patch_reported(client, patch)
            .await
            .map_err(|e| rejection(&e))
    }

    async fn method_response(&self, client: &ClientId, rid: &str, status: i64, payload: Bytes) {
        let Ok(rid) = rid.parse::<u64>() else {
            tracing::debug!(client = %client, rid, "method response with a foreign request id");
            return;
        };
        let payload = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()))
        };
        // Out-of-range statuses are the device's bug; report them as 500.
        let status = i32::try_from(status).unwrap_or(500);
        if !self
            .cloud
            .method_response(client, rid, MethodResponse { status, payload })
        {
            tracing::debug!(client = %client, rid, "method response for no pending call");
        }
    }
}

/// Pushes one connection's [`ConnectionEvent`]s to its client.
struct Pump {
    cloud: CloudState,
    sessions: Arc<Sessions>,
    client_id: String,
    conn: ConnHandle,
    /// C2D deliveries waiting for the client's PUBACK.
    acks: JoinSet<()>,
}

/// Why the pump stops.
struct Gone;

impl Pump {
    async fn run(mut self, mut registration: Connection) {
        let client = registration.client().clone();
        let c2d_probe = format!("devices/{}/messages/devicebound/", client.device);
        let mut changed = self.sessions.watch();
        // C2D is pulled when the device (re)gains its devicebound
        // subscription, when the cloud says a message is waiting, and on resync.
        let mut c2d_listening = false;
        loop {
            let listening = client.module.is_none()
                && self
                    .sessions
                    .deliverable(&self.client_id, &c2d_probe)
                    .is_some();
            if listening && !c2d_listening && self.pull_c2d(&client).await.is_err() {
                return;
            }
            c2d_listening = listening;
            let step = tokio::select! {
                ev = registration.recv() => match ev {
                    Some(ev) => self.on_event(&client, ev, c2d_listening).await,
                    None => {
                        // Replaced by a newer connection of this identity
                        // (or the cloud closed): close this client.
                        self.conn.kick.notify_one();
                        Err(Gone)
                    }
                },
                r = changed.changed() => r.map_err(|_| Gone),
                Some(_) = self.acks.join_next(), if !self.acks.is_empty() => Ok(()),
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn on_event(
        &mut self,
        client: &ClientId,
        ev: ConnectionEvent,
        c2d_listening: bool,
    ) -> Result<(), Gone> {
        match ev {
            ConnectionEvent::Method(m) => {
                let topic = format!("$iothub/methods/POST/{}/?$rid={}", m.name, m.rid);
                if self.sessions.deliverable(&self.client_id, &topic).is_none() {
                    // The caller times out, as with IoT Hub when the device
                    // does not listen for methods.
                    tracing::info!(client = %client, method = %m.name, "method call for a client not subscribed to methods");
                    return Ok(());
                }
                self.push(topic, json_bytes(&m.payload), None).await
            }
            ConnectionEvent::DesiredPatch(patch) => self.push_desired(patch).await,
            ConnectionEvent::C2dAvailable if c2d_listening => self.pull_c2d(client).await,
            ConnectionEvent::C2dAvailable => Ok(()),
            ConnectionEvent::Resync => {
                match self.cloud.get_twin(client) {
                    Ok(t) => {
                        let desired = t.twin.to_client_json()["desired"].clone();
                        self.push_desired(desired).await?;
                    }
                    Err(e) => {
                        tracing::warn!(client = %client, error = %e, "resync: twin unreadable")
                    }
                }
                if c2d_listening {
                    self.pull_c2d(client).await?;
                }
                Ok(())
            }
        }
    }

    async fn push_desired(&mut self, patch: Value) -> Result<(), Gone> {
        let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
        let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
        if self.sessions.deliverable(&self.client_id, &topic).is_none() {
            // Not listening: the client reads the twin when it starts to.
            return Ok(());
        }
        self.push(topic, json_bytes(&patch), None).await
    }

    /// Hands every waiting C2D message to the client, each settled
    /// `Complete` on its PUBACK. One that is not acknowledged stays locked
    /// until the connection's end returns it to the queue.
    async fn pull_c2d(&mut self, client: &ClientId) -> Result<(), Gone> {
        let device = client.device.as_str();
        loop {
            let d: C2dDelivery = match self.cloud.c2d_next(device).await {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(client = %client, error = %e, "C2D pull failed");
                    return Ok(());
                }
            };
            let m = &d.message;
            let topic = format!(
                "devices/{device}/messages/devicebound/{}",
                encode_bag(&m.system, &m.properties)
            );
            let (tx, rx) = oneshot::channel();
            self.push(topic, m.body.clone(), Some(tx)).await?;
            let (cloud, device, token) = (self.cloud.clone(), device.to_owned(), d.lock_token);
            self.acks.spawn(async move {
                if rx.await.is_ok()
                    && let Err(e) = cloud
                        .c2d_settle(&device, &token, Settlement::Complete)
                        .await
                {
                    tracing::warn!(%device, error = %e, "C2D completion failed");
                }
            });
        }
    }

    async fn push(
        &self,
        topic: String,
        payload: Bytes,
        ack: Option<oneshot::Sender<()>>,
    ) -> Result<(), Gone> {
        tracing::debug!(client = %self.client_id, %topic, bytes = payload.len(), "pushing to the client");
        let out = Outbound {
            topic,
            payload,
            ack,
        };
        match tokio::time::timeout(PUSH_TIMEOUT, self.conn.tx.send(out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone),
            Err(_) => {
                // The client does not read: close it rather than stall its events.
                tracing::warn!(client = %self.client_id, "client not reading; closing it");
                self.conn.kick.notify_one();
                Err(Gone)
            }
        }
    }
}

fn json_bytes(v: &Value) -> Bytes {
    // Serializing a Value cannot fail.
    serde_json::to_vec(v).unwrap_or_default().into()
}

/// The device port's caps: two thirds of what `RLIMIT_NOFILE` leaves (the
/// service API gets the rest, [`crate::api::listen_limits`]), half of it
/// per peer address; TLS and CONNECT within `connect_timeout`.
pub fn listen_limits(connect_timeout: Duration) -> verge_listen::Limits {
    let shares = verge_listen::fds::share(verge_listen::fds::fd_limit(), 256, &[2, 1]);
    verge_listen::Limits::new(shares.first().copied().unwrap_or(1), connect_timeout)
}

/// Serves MQTT over TLS on `listener` until `shutdown` completes; open
/// connections are closed then.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<CloudBackend>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = listen_limits(backend.limits.connect_timeout);
    serve_with(listener, tls, backend, shutdown, limits).await;
}

/// [`serve`] with explicit caps.
pub async fn serve_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<CloudBackend>,
    shutdown: impl Future<Output = ()>,
    limits: verge_listen::Limits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let be = backend.clone();
    verge_listen::Listener::new(
        "device-mqtt",
        listener,
        limits,
        verge_listen::CancellationToken::new(),
    )
    .run_until(
        move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
            let (backend, acceptor) = (be.clone(), acceptor.clone());
            async move {
                let _ = tcp.set_nodelay(true);
                let peer = conn.peer().to_string();
                match conn.handshake(acceptor.accept(tcp)).await {
                    Some(Ok(stream)) => {
                        // X.509 devices: the chain goes to CONNECT.
                        let certs = verge_x509::client_chain(stream.get_ref().1);
                        // DPS or IoT Hub, by the CONNECT's username.
                        crate::dps::demux::serve(backend, stream, peer, certs).await;
                    }
                    Some(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    None => {}
                }
            }
        },
        shutdown,
    )
    .await;
    if let Err(e) = backend.sessions.flush().await {
        tracing::warn!(error = %e, "cannot save MQTT sessions");
    }
}

/// Serves IoT Hub's AMQP device side (AMQPS, IoT Hub's port 5671) on
/// `listener` until `shutdown`: TLS through `verge-listen` (permits,
/// handshake deadline), then verge-amqp's endpoint over the same backend as
/// MQTT, so an AMQP device's telemetry, twin, methods and C2D are the
/// cloud's as an MQTT device's are.
pub async fn serve_amqps(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<CloudBackend>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limits = listen_limits(backend.limits.connect_timeout);
    verge_listen::Listener::new(
        "device-amqps",
        listener,
        limits,
        verge_listen::CancellationToken::new(),
    )
    .run_until(
        move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
            let (backend, acceptor) = (backend.clone(), acceptor.clone());
            async move {
                let _ = tcp.set_nodelay(true);
                let peer = conn.peer().to_string();
                match conn.handshake(acceptor.accept(tcp)).await {
                    Some(Ok(stream)) => {
                        let stop = conn.cancel_token().clone();
                        // X.509 devices authenticate by this chain.
                        let certs = verge_x509::client_chain(stream.get_ref().1);
                        verge_amqp::serve_with_certs(
                            backend,
                            stream,
                            peer,
                            verge_amqp::Config::default(),
                            stop,
                            certs,
                            verge_endpoint::session::Transport::Amqp,
                        )
                        .await;
                    }
                    Some(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    None => {}
                }
            }
        },
        shutdown,
    )
    .await;
}

/// The TLS configuration of the MQTT port: the service API's identity
/// without its HTTP ALPN (MQTT clients offer none, or `mqtt`).
pub fn mqtt_tls(api: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut cfg = api.clone();
    cfg.alpn_protocols.clear();
    Arc::new(cfg)
}
