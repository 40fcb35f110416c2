//! One AMQP connection, from its first byte to its end.
//!
//! 1. The 8-byte protocol header decides the security layer: the SASL header
//!    (uamqp, the C SDK, Proton) or the bare AMQP header (the C# SDK, which
//!    then authenticates through `$cbs`). Header, SASL and OPEN must complete
//!    within [`Config::open_timeout`].
//! 2. Sessions and links are accepted as clients open them. Every identity
//!    link is authorized against the connection's [`Tokens`]; a token's
//!    expiry closes that identity's links; a connection that holds no valid
//!    token for [`Config::auth_timeout`] is closed.
//! 3. An identity with an open link is attached to the backend's session
//!    registry like an MQTT client, so the backend's deliveries (module
//!    inputs) reach its receiver link.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SessionAcceptor, SupportedReceiverSettleModes,
};
use fe2o3_amqp::link::delivery::{Delivery, DeliveryInfo};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{
    self, AmqpError, ConnectionError, ErrorCondition, ReceiverSettleMode, Role,
};
use fe2o3_amqp::types::messaging::{Body, Message, Outcome, TargetArchetype};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Notify, mpsc};
use verge_core::ClientId;
use verge_endpoint::Backend;
use verge_endpoint::auth::{CertificateDer, Credentials, unix_now};
use verge_endpoint::session::{ConnHandle, Outbound, Transport};

use verge_shutdown::CancellationToken;
use verge_shutdown::TaskTracker;

use crate::Config;
use crate::address::{self, Kind};
use crate::cbs::{self, CbsError, Tokens};
use crate::convert;
use crate::sasl::Mechanisms;
use crate::stream::Rewind;

mod transfer;

const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// Telemetry transfers of one link being made durable at once.
const INBOUND_WINDOW: usize = 64;
/// Deliveries queued for one identity (as the MQTT endpoint's outbound queue).
const OUTBOUND_QUEUE: usize = 128;
/// CBS replies queued for a session's reply link.
const CBS_QUEUE: usize = 16;
/// Sessions one connection may open: the C# SDK's pool puts one session per
/// identity on a connection (`amqp-iothub.md` §5), so room for many.
const MAX_CHANNEL: u16 = 1023;
/// Sessions a connection may hold beyond one per identity with a token:
/// room for the `$cbs` session and for sessions a client opens before their
/// put-tokens (the C# SDK's pool opens a session per device, several at
/// once, spread over up to 100 connections), not for a storm of sessions (a
/// task each) from a client that never authenticates.
const SPARE_SESSIONS: usize = 32;
/// Links one session may hold: an identity needs at most eight (telemetry,
/// inputs, C2D, twin and methods both ways, CBS pair), so an attach storm
/// ends the connection instead of growing it.
const MAX_HANDLE: u32 = 63;
/// Identities one connection may hold tokens for (the Java SDK's multiplexing
/// limit is 1000 per AMQPS connection); edgeHub refuses more CBS tokens too.
const MAX_IDENTITIES: usize = 1000;
/// How long a CBS answer waits for the session's reply link to attach.
const CBS_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Time to send CLOSE/DETACH on the way out.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An AMQP error with `condition` and `description`.
pub fn error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

/// A vendor error condition (`com.microsoft:…`).
fn vendor(name: &str) -> ErrorCondition {
    ErrorCondition::Custom(Symbol::from(name))
}

/// A backend rejection as edgeHub maps it to an AMQP condition.
fn rejection_error(r: &verge_endpoint::Rejection) -> definitions::Error {
    let cond: ErrorCondition = match r.status {
        401 | 403 => AmqpError::UnauthorizedAccess.into(),
        404 => AmqpError::NotFound.into(),
        413 => AmqpError::ResourceLimitExceeded.into(),
        429 => vendor("com.microsoft:device-container-throttled"),
        400..=499 => vendor("com.microsoft:argument-error"),
        _ => AmqpError::InternalError.into(),
    };
    error(cond, r.message.clone())
}

/// A session's `$cbs` reply link, once the client opened it.
type CbsReply = Arc<tokio::sync::watch::Sender<Option<mpsc::Sender<Message<Body<Value>>>>>>;

/// Where an identity's deliveries go, per link kind.
#[derive(Default)]
pub(crate) struct Routes {
    pub(crate) inputs: Option<mpsc::Sender<Push>>,
    pub(crate) twin: Option<mpsc::Sender<Push>>,
    pub(crate) methods: Option<mpsc::Sender<Push>>,
    /// A device's cloud-to-device messages.
    pub(crate) c2d: Option<mpsc::Sender<Push>>,
    /// Method requests in flight: the uuid correlation id sent (what the C
    /// SDK requires) → the backend's request id.
    pub(crate) method_rids: HashMap<uuid::Uuid, String>,
}

/// A message for one of an identity's sender links; `ack` fires when the
/// client accepts it.
pub(crate) struct Push {
    pub(crate) msg: Message<Body<Value>>,
    pub(crate) ack: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Which of an identity's sender links.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PushKind {
    Inputs,
    Twin,
    Methods,
    /// Cloud-to-device messages of a (leaf) device.
    C2d,
}

impl Routes {
    pub(crate) fn slot(&mut self, kind: PushKind) -> &mut Option<mpsc::Sender<Push>> {
        match kind {
            PushKind::Inputs => &mut self.inputs,
            PushKind::Twin => &mut self.twin,
            PushKind::Methods => &mut self.methods,
            PushKind::C2d => &mut self.c2d,
        }
    }
}

/// An identity attached to the backend from this connection.
struct Identity<L> {
    conn_id: u64,
    /// Its links open on this connection: when the last one closes the
    /// identity leaves (as a client whose session ended), so an edge hub
    /// that ends an idle identity's session shows it disconnected.
    links: usize,
    /// Cancelled when another connection takes the identity over.
    cancel: CancellationToken,
    routes: Arc<std::sync::Mutex<Routes>>,
    link: L,
}

struct Shared<B: Backend> {
    backend: Arc<B>,
    cfg: Config,
    peer: String,
    transport: Transport,
    tokens: Tokens,
    /// The client certificate chain of the TLS handshake (leaf first), if
    /// any: an identity without a token is authenticated by it (X.509).
    certs: Vec<CertificateDer<'static>>,
    identities: Mutex<HashMap<ClientId, Identity<B::Link>>>,
    cancel: CancellationToken,
    /// Why a session task ended the whole connection (set before it
    /// cancels `cancel`): the CLOSE carries it.
    fatal: std::sync::Mutex<Option<definitions::Error>>,
    tasks: TaskTracker,
}

pub(crate) fn lock_routes(r: &std::sync::Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves one client stream (already TLS-terminated, or a WebSocket) to the
/// end, or until `shutdown`.
pub async fn serve<B, S>(
    backend: Arc<B>,
    stream: S,
    peer: String,
    cfg: Config,
    shutdown: CancellationToken,
) where
    B: Backend,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_with_certs(
        backend,
        stream,
        peer,
        cfg,
        shutdown,
        Vec::new(),
        Transport::Amqp,
    )
    .await;
}

/// [`serve`] for a client that presented `certs` (leaf first) in its TLS
/// handshake: a link whose identity holds no token is opened if the
/// backend authenticates that identity by the certificate (X.509 devices,
/// as over MQTT; no `$cbs` needed). `transport` says what carries the
/// stream, for [`ConnHandle::transport`].
pub async fn serve_with_certs<B, S>(
    backend: Arc<B>,
    mut stream: S,
    peer: String,
    cfg: Config,
    shutdown: CancellationToken,
    certs: Vec<CertificateDer<'static>>,
    transport: Transport,
) where
    B: Backend,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout(cfg.open_timeout, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "AMQP connection ended before its header");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "no AMQP header in time; closing");
            return;
        }
    }
    let mechanisms = Mechanisms::default();
    // Tripped when serve returns: the socket is released even if the
    // client never answers our CLOSE.
    let kill = CancellationToken::new();
    let _kill_on_return = kill.clone().drop_guard();
    let io = Rewind::new(header, stream, kill, cfg.max_frame_size);
    let opened = match header {
        SASL_HEADER => {
            let acceptor = acceptor(&cfg)
                .into_builder()
                .sasl_acceptor(mechanisms.clone())
                .build();
            tokio::time::timeout(cfg.open_timeout, acceptor.accept(io)).await
        }
        AMQP_HEADER => {
            let acceptor = acceptor(&cfg);
            tokio::time::timeout(cfg.open_timeout, acceptor.accept(io)).await
        }
        other => {
            // The spec's answer to an unsupported header: ours, then close.
            let mut io = io;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.write_all(&AMQP_HEADER)).await;
            tracing::info!(%peer, header = ?other, "not an AMQP 1.0 header; closing");
            return;
        }
    };
    let mut conn = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "AMQP open failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "AMQP SASL/OPEN not done in time; closing");
            return;
        }
    };
    let shared = Arc::new(Shared {
        backend,
        cfg,
        peer,
        transport,
        tokens: Tokens::default(),
        certs,
        identities: Mutex::new(HashMap::new()),
        cancel: shutdown.child_token(),
        fatal: std::sync::Mutex::new(None),
        tasks: TaskTracker::new(),
    });
    // SASL PLAIN pins one identity for the connection's life (as edgeHub).
    if let Some(plain) = mechanisms.plain() {
        let checked = match ClientId::parse_resource(&format!("devices/{}", plain.identity)) {
            Ok(client) => shared
                .authenticate(&client, &plain.token)
                .await
                .map(|expiry| (client, expiry)),
            Err(e) => Err(CbsError {
                status: 401,
                description: e.to_string(),
            }),
        };
        match checked {
            Ok((client, expiry)) => {
                tracing::info!(peer = %shared.peer, %client, "AMQP SASL PLAIN authenticated");
                shared.tokens.put(client, expiry);
            }
            Err(e) => {
                tracing::warn!(peer = %shared.peer, identity = %plain.identity, reason = %e, "AMQP SASL PLAIN refused");
                close(
                    &mut conn,
                    Some(error(
                        AmqpError::UnauthorizedAccess,
                        "authentication failed",
                    )),
                )
                .await;
                return;
            }
        }
    }
    let reason = shared.clone().run(&mut conn).await;
    shared.cancel.cancel();
    close(&mut conn, reason).await;
    shared.tasks.close();
    shared.tasks.wait().await;
    shared.detach_all().await;
}

fn acceptor(cfg: &Config) -> ConnectionAcceptor<(), ()> {
    ConnectionAcceptor::builder()
        .container_id(format!("verge-{}", uuid::Uuid::new_v4().simple()))
        .max_frame_size(cfg.max_frame_size)
        .channel_max(MAX_CHANNEL)
        .idle_time_out(u32::try_from(cfg.idle_timeout.as_millis()).unwrap_or(u32::MAX))
        .build()
}

async fn close(conn: &mut ListenerConnectionHandle, err: Option<definitions::Error>) {
    let fut = async {
        match err {
            Some(e) => conn.close_with_error(e).await,
            None => conn.close().await,
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, fut).await;
}

impl<B: Backend> Shared<B> {
    /// Accepts sessions until the connection ends; returns the error to
    /// close it with, if any.
    async fn run(
        self: Arc<Self>,
        conn: &mut ListenerConnectionHandle,
    ) -> Option<definitions::Error> {
        let session_acceptor = SessionAcceptor::builder().handle_max(MAX_HANDLE).build();
        let mut auth_check = tokio::time::interval(self.cfg.auth_timeout);
        auth_check.tick().await;
        // Live sessions: each ends its task by dropping its guard.
        let live = Arc::new(());
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => {
                    return self.fatal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                }
                _ = auth_check.tick() => {
                    if !self.tokens.any_valid(unix_now()) {
                        tracing::info!(peer = %self.peer, "AMQP connection without a valid token; closing");
                        return Some(error(AmqpError::UnauthorizedAccess, "no valid token on this connection"));
                    }
                }
                incoming = conn.next_incoming_session() => {
                    let incoming = incoming?;
                    // One live `Arc` per session besides ours.
                    let sessions = Arc::strong_count(&live) - 1;
                    let allowed = (self.tokens.len() + SPARE_SESSIONS).min(usize::from(MAX_CHANNEL) + 1);
                    if sessions >= allowed {
                        tracing::warn!(peer = %self.peer, sessions, allowed, "AMQP session past the connection's allowance; closing the connection");
                        return Some(error(
                            AmqpError::ResourceLimitExceeded,
                            format!("{sessions} sessions open; {allowed} allowed for the identities authenticated"),
                        ));
                    }
                    match session_acceptor.accept_incoming_session(incoming, conn).await {
                        Ok(session) => {
                            let this = self.clone();
                            let guard = live.clone();
                            self.tasks.spawn(async move {
                                this.session(session).await;
                                drop(guard);
                            });
                        }
                        Err(e) => {
                            tracing::info!(peer = %self.peer, error = %e, "AMQP session refused");
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Ends the connection from a session task, closing it with `why`.
    fn end_connection(&self, why: definitions::Error) {
        self.fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(why);
        self.cancel.cancel();
    }

    /// Checks `token` for `client` with the backend; returns its expiry.
    async fn authenticate(&self, client: &ClientId, token: &str) -> Result<u64, CbsError> {
        let parsed = verge_core::SasToken::parse(token).map_err(|e| CbsError {
            status: 401,
            description: e.to_string(),
        })?;
        let id = client.to_string();
        let creds = Credentials {
            client_id: &id,
            username: None,
            password: Some(token.as_bytes()),
            // A SAS token: the certificate path is `authenticate_cert`.
            client_certs: &[],
        };
        match self.backend.authenticate(&creds).await {
            Ok(who) if &who == client => Ok(parsed.expiry()),
            Ok(who) => Err(CbsError {
                status: 401,
                description: format!("token is for {who}"),
            }),
            Err(e) => Err(CbsError {
                status: 401,
                description: e.to_string(),
            }),
        }
    }

    /// With a client certificate and no token for `client`: whether the
    /// backend authenticates `client` by the certificate; if so the identity
    /// is held for the connection's life (the TLS handshake checked the key,
    /// the backend the certificate's validity).
    async fn authenticate_cert(&self, client: &ClientId) -> bool {
        if self.certs.is_empty() {
            return false;
        }
        let id = client.to_string();
        let creds = Credentials {
            client_id: &id,
            username: None,
            password: None,
            client_certs: &self.certs,
        };
        match self.backend.authenticate(&creds).await {
            Ok(who) if &who == client => {
                tracing::info!(peer = %self.peer, %client, "AMQP identity authenticated by its X.509 certificate");
                self.tokens.put(client.clone(), u64::MAX);
                true
            }
            Ok(who) => {
                tracing::warn!(peer = %self.peer, %client, %who, "AMQP certificate is another identity's");
                false
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, %client, reason = %e, "AMQP X.509 authentication refused");
                false
            }
        }
    }

    /// Serves one session's links.
    async fn session(self: Arc<Self>, mut session: ListenerSessionHandle) {
        // Receiver-settle-mode `first` on every link, whatever the client
        // asks: uamqp asks for `second` on its sender links but only
        // completes a send on a settled disposition (edgeHub answers `first`
        // too, the receiver's attach being authoritative).
        let link_acceptor = LinkAcceptor::builder()
            .max_message_size(self.cfg.max_message_size)
            .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
            .fallback_receiver_settle_mode(ReceiverSettleMode::First)
            .build();
        let cbs_reply: CbsReply = Arc::new(tokio::sync::watch::Sender::new(None));
        loop {
            let attach = tokio::select! {
                () = self.cancel.cancelled() => break,
                a = session.next_incoming_attach() => match a {
                    Some(a) => a,
                    None => break,
                },
            };
            // fe2o3 does not hold the client to the handle-max we offered:
            // past it the spec has the connection closed (framing-error), so
            // an attach storm cannot grow a session without bound.
            if attach.handle.0 > MAX_HANDLE {
                tracing::warn!(peer = %self.peer, handle = attach.handle.0, max = MAX_HANDLE, "AMQP attach past the session's handle-max; closing the connection");
                self.end_connection(error(
                    ConnectionError::FramingError,
                    format!(
                        "link handle {} is above the handle-max {MAX_HANDLE}",
                        attach.handle.0
                    ),
                ));
                break;
            }
            let remote_sender = attach.role == Role::Sender;
            let addr = terminus_address(&attach, remote_sender);
            let name = attach.name.clone();
            let link = match link_acceptor
                .accept_incoming_attach(attach, &mut session)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::info!(peer = %self.peer, link = %name, error = %e, "AMQP attach failed");
                    continue;
                }
            };
            let addr = addr.unwrap_or_default();
            if address::is_cbs(&addr) {
                match link {
                    LinkEndpoint::Receiver(r) => {
                        let (this, reply) = (self.clone(), cbs_reply.clone());
                        self.tasks
                            .spawn(async move { this.cbs_requests(r, reply).await });
                    }
                    LinkEndpoint::Sender(s) => {
                        let (tx, rx) = mpsc::channel(CBS_QUEUE);
                        cbs_reply.send_replace(Some(tx));
                        let cancel = self.cancel.clone();
                        self.tasks.spawn(cbs_replies(s, rx, cancel));
                    }
                }
                continue;
            }
            let Some(target) = address::parse(&addr) else {
                tracing::info!(peer = %self.peer, address = %addr, "AMQP link to an unknown address");
                refuse(
                    link,
                    error(AmqpError::NotFound, format!("no node {addr:?}")),
                )
                .await;
                continue;
            };
            if !self.tokens.valid(&target.client, unix_now())
                && !self.authenticate_cert(&target.client).await
            {
                tracing::warn!(peer = %self.peer, client = %target.client, address = %addr, "AMQP link refused: no valid token for its identity");
                refuse(
                    link,
                    error(
                        AmqpError::UnauthorizedAccess,
                        format!("no valid token for {}", target.client),
                    ),
                )
                .await;
                continue;
            }
            let (ident_cancel, routes) = match self.identity(&target.client).await {
                Ok(x) => x,
                Err(e) => {
                    refuse(link, e).await;
                    continue;
                }
            };
            let this = self.clone();
            let client = target.client.clone();
            let served: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                match (target.kind, link) {
                    (Kind::Events, LinkEndpoint::Receiver(r)) => {
                        Box::pin(this.clone().telemetry(target.client, r, ident_cancel))
                    }
                    (Kind::Events, LinkEndpoint::Sender(s)) if target.client.is_module() => {
                        Box::pin(this.clone().push_link(
                            target.client,
                            s,
                            ident_cancel,
                            routes,
                            PushKind::Inputs,
                        ))
                    }
                    (Kind::DeviceBound, LinkEndpoint::Sender(s)) => {
                        Box::pin(this.clone().push_link(
                            target.client,
                            s,
                            ident_cancel,
                            routes,
                            PushKind::C2d,
                        ))
                    }
                    (Kind::Twin, LinkEndpoint::Sender(s)) => Box::pin(this.clone().push_link(
                        target.client,
                        s,
                        ident_cancel,
                        routes,
                        PushKind::Twin,
                    )),
                    (Kind::Methods, LinkEndpoint::Sender(s)) => Box::pin(this.clone().push_link(
                        target.client,
                        s,
                        ident_cancel,
                        routes,
                        PushKind::Methods,
                    )),
                    (kind @ (Kind::Twin | Kind::Methods), LinkEndpoint::Receiver(r)) => Box::pin(
                        this.clone()
                            .request_link(target.client, r, ident_cancel, routes, kind),
                    ),
                    (_, link) => {
                        refuse(
                            link,
                            error(
                                AmqpError::NotImplemented,
                                format!("{:?} links are not served over AMQP yet", target.kind),
                            ),
                        )
                        .await;
                        self.link_closed(&client).await;
                        continue;
                    }
                };
            self.tasks.spawn(async move {
                served.await;
                this.link_closed(&client).await;
            });
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.end()).await;
    }

    /// Attaches `client` to the backend (once per connection): a session in
    /// the registry whose deliveries this connection routes to its links.
    async fn identity(
        self: &Arc<Self>,
        client: &ClientId,
    ) -> Result<(CancellationToken, Arc<std::sync::Mutex<Routes>>), definitions::Error> {
        let mut ids = self.identities.lock().await;
        if let Some(i) = ids.get_mut(client) {
            i.links += 1;
            return Ok((i.cancel.clone(), i.routes.clone()));
        }
        let sessions = self.backend.sessions();
        let (tx, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
        let kick = Arc::new(Notify::new());
        let conn_id = sessions.next_conn_id();
        let handle = ConnHandle {
            id: conn_id,
            transport: self.transport,
            tx,
            kick: kick.clone(),
        };
        let client_id = client.to_string();
        sessions.attach(&client_id, true, handle.clone());
        let link = match self.backend.connected(client, &handle).await {
            Ok(l) => l,
            Err(e) => {
                sessions.detach(&client_id, conn_id);
                return Err(rejection_error(&e));
            }
        };
        drop(handle);
        tracing::info!(peer = %self.peer, client = %client_id, "client connected (AMQP)");
        let cancel = self.cancel.child_token();
        let routes: Arc<std::sync::Mutex<Routes>> = Arc::default();
        ids.insert(
            client.clone(),
            Identity {
                conn_id,
                links: 1,
                cancel: cancel.clone(),
                routes: routes.clone(),
                link,
            },
        );
        // Routes the backend's deliveries to the identity's links; a
        // delivery with no link open is dropped unacknowledged (the backend
        // redelivers it).
        let (c, r, who, who_id) = (cancel.clone(), routes.clone(), client_id, client.clone());
        self.tasks.spawn(async move {
            loop {
                let out = tokio::select! {
                    () = c.cancelled() => break,
                    () = kick.notified() => {
                        tracing::info!(client = %who, "AMQP identity taken over by another connection");
                        c.cancel();
                        break;
                    }
                    o = rx.recv() => match o { Some(o) => o, None => break },
                };
                if let Some((route, push)) = crate::links::dispatch(&who_id, &r, out) {
                    let _ = route.send(push).await;
                }
            }
        });
        Ok((cancel, routes))
    }

    /// One of `client`'s links ended; with its last, the identity leaves
    /// the session registry and the backend hears it disconnected (its
    /// token stays: a new link brings it back).
    async fn link_closed(&self, client: &ClientId) {
        let mut ids = self.identities.lock().await;
        let Some(i) = ids.get_mut(client) else {
            return;
        };
        i.links = i.links.saturating_sub(1);
        if i.links > 0 {
            return;
        }
        let Some(ident) = ids.remove(client) else {
            return;
        };
        drop(ids);
        ident.cancel.cancel();
        self.backend
            .sessions()
            .detach(&client.to_string(), ident.conn_id);
        self.backend.disconnected(client, ident.link).await;
        tracing::info!(peer = %self.peer, %client, "client disconnected (AMQP): its last link closed");
    }

    /// Leaves the session registry and tells the backend, per identity.
    async fn detach_all(&self) {
        let ids: Vec<_> = self.identities.lock().await.drain().collect();
        let sessions = self.backend.sessions();
        for (client, ident) in ids {
            sessions.detach(&client.to_string(), ident.conn_id);
            self.backend.disconnected(&client, ident.link).await;
            tracing::info!(peer = %self.peer, %client, "client disconnected (AMQP)");
        }
    }

    /// The `$cbs` request link: put-token requests, answered on the
    /// session's reply link.
    async fn cbs_requests(self: Arc<Self>, mut receiver: Receiver, reply: CbsReply) {
        loop {
            let delivery = tokio::select! {
                () = self.cancel.cancelled() => break,
                d = receiver.recv::<Body<Value>>() => match d {
                    Ok(d) => d,
                    Err(_) => break,
                },
            };
            let _ = receiver.accept(&delivery).await;
            let request = delivery.message();
            let (status, description) = match cbs::parse_request(request) {
                Err(e) => (e.status, e.description),
                Ok(put)
                    if self.tokens.len() >= MAX_IDENTITIES
                        && !self.tokens.contains(&put.client) =>
                {
                    (
                        403,
                        format!("more than {MAX_IDENTITIES} identities on one connection"),
                    )
                }
                Ok(put) => match self.authenticate(&put.client, &put.token).await {
                    Ok(expiry) => {
                        let renewed = self.tokens.valid(&put.client, unix_now());
                        self.tokens.put(put.client.clone(), expiry.min(put.expiry));
                        tracing::info!(peer = %self.peer, client = %put.client, renewed, "AMQP CBS token accepted");
                        (200, "OK".to_owned())
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, client = %put.client, reason = %e, "AMQP CBS token refused");
                        (e.status, e.description)
                    }
                },
            };
            // The reply link may still be attaching (a client can send as
            // soon as it saw our ATTACH); no reply link, no reply (as edgeHub).
            let mut slot = reply.subscribe();
            let tx = tokio::time::timeout(CBS_REPLY_WAIT, slot.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|s| s.clone()));
            if let Some(tx) = tx {
                let _ = tx.send(cbs::response(request, status, &description)).await;
            }
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, receiver.close()).await;
    }
}

/// Closes a just-accepted link with `err` (how an attach is refused).
async fn refuse(link: LinkEndpoint, err: definitions::Error) {
    let fut = async {
        match link {
            LinkEndpoint::Sender(s) => s.close_with_error(err).await,
            LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, fut).await;
}

/// The `$cbs` reply link: sends what the request link answers.
async fn cbs_replies(
    mut sender: Sender,
    mut rx: mpsc::Receiver<Message<Body<Value>>>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => break,
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        let sent = tokio::select! {
            () = cancel.cancelled() => break,
            r = sender.send(msg) => r,
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
}

/// The address of the remote's terminus that names the node: the target
/// of a remote sender, the source of a remote receiver.
#[allow(irrefutable_let_patterns)]
fn terminus_address(attach: &Attach, remote_sender: bool) -> Option<String> {
    if remote_sender {
        let t = attach.target.as_deref()?;
        if let TargetArchetype::Target(t) = t {
            t.address.clone()
        } else {
            None
        }
    } else {
        attach.source.as_deref()?.address.clone()
    }
}
