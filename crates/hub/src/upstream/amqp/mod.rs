//! The AMQP upstream (`UpstreamProtocol` `Amqp` on 5671, `AmqpWs` over
//! WebSocket on 443, through `https_proxy` when set): **one connection
//! carries every identity of the edge**, as edgeHub multiplexes
//! (`amqp-iothub.md` §5).
//!
//! * The [`Mux`] task owns the connection (SASL ANONYMOUS, then claims-based
//!   security on `$cbs`, [`cbs`]): it dials with the upstream's dialer and
//!   serves the identities' requests — begin a session (one at a time: the
//!   connection handle is used by this task only), put a token (pipelined:
//!   many in flight, answers matched by correlation id). The edge's own
//!   identity, the connectivity probe, is served first. It publishes the
//!   connection's state ([`MuxState`]); when the connection ends every
//!   identity's links fail, their link tasks wait for it, and it redials
//!   every `reconnect_ms`.
//! * Each identity keeps its own link task ([`super::link::run_link`]: the
//!   same states, refusal back-off, epochs and drain hand-off as an MQTT
//!   link); over AMQP it owns a session on the shared connection with its
//!   links in it ([`session`]). A token the cloud refuses refuses only that
//!   identity.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use verge_core::{ClientId, SharedAccessKey};

use super::link::{ConnectError, sign};
use super::{HANDSHAKE_TIMEOUT, Shared, Upstream};

mod cbs;
mod session;

pub(super) use session::session;

/// Identities' requests waiting for the connection task at most (each
/// identity has at most one in flight).
const MUX_QUEUE: usize = 256;
/// Largest frame we offer; messages larger than a frame are split.
const MAX_FRAME: u32 = 64 * 1024;

/// The shared connection's state.
#[derive(Debug, Clone)]
pub(super) enum MuxState {
    /// Open; the number counts connections, so an identity's request made
    /// for an earlier one is not served on a later one.
    Up(u64),
    /// Not open (why).
    Down(String),
}

/// What an identity asks of the connection task.
enum Ask {
    /// Begin a session.
    Session(oneshot::Sender<Result<SessionHandle<()>, ConnectError>>),
    /// Put a token on `$cbs`: its `name` (the identity's resource), the
    /// token and its expiry (unix seconds).
    Token {
        audience: String,
        token: String,
        expiry: u64,
        reply: oneshot::Sender<Result<(), ConnectError>>,
    },
}

impl Ask {
    fn fail(self, why: String) {
        let e = ConnectError::Failed(why);
        match self {
            Ask::Session(r) => drop(r.send(Err(e))),
            Ask::Token { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// A request for connection `generation` (not served on a later one).
struct MuxReq {
    generation: u64,
    ask: Ask,
}

/// The identities' handle on the shared connection.
pub(super) struct Mux {
    /// The edge's own identity (the connectivity probe) and everyone else's.
    first: mpsc::Sender<MuxReq>,
    rest: mpsc::Sender<MuxReq>,
    state: watch::Receiver<MuxState>,
}

/// The connection task's ends of a [`Mux`].
pub(super) struct MuxTask {
    first: mpsc::Receiver<MuxReq>,
    rest: mpsc::Receiver<MuxReq>,
    state: watch::Sender<MuxState>,
}

impl Mux {
    /// The handle and the connection task's ends (run by [`run`]).
    pub(super) fn new() -> (Mux, MuxTask) {
        let (first, first_rx) = mpsc::channel(4);
        let (rest, rest_rx) = mpsc::channel(MUX_QUEUE);
        let (state_tx, state) = watch::channel(MuxState::Down("connecting".into()));
        (
            Mux { first, rest, state },
            MuxTask {
                first: first_rx,
                rest: rest_rx,
                state: state_tx,
            },
        )
    }

    /// A receiver of the connection's state.
    pub(super) fn watch(&self) -> watch::Receiver<MuxState> {
        self.state.clone()
    }

    /// Resolves `true` when the connection (re)opens; never without one.
    pub(super) async fn came_up(rx: &mut Option<watch::Receiver<MuxState>>) -> bool {
        let Some(rx) = rx else {
            return std::future::pending().await;
        };
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if matches!(*rx.borrow_and_update(), MuxState::Up(_)) {
                return true;
            }
        }
    }

    async fn ask<T>(
        &self,
        first: bool,
        generation: u64,
        ask: impl FnOnce(oneshot::Sender<Result<T, ConnectError>>) -> Ask,
    ) -> Result<T, ConnectError> {
        let (reply, rx) = oneshot::channel();
        let req = MuxReq {
            generation,
            ask: ask(reply),
        };
        let gone = || ConnectError::Failed("the upstream AMQP connection task stopped".into());
        let tx = if first { &self.first } else { &self.rest };
        tx.send(req).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Puts a token signed as `signer` for `id` on connection `generation`;
    /// its expiry.
    async fn put_token(
        &self,
        up: &Upstream,
        first: bool,
        generation: u64,
        id: &ClientId,
        signer: &ClientId,
        key: &SharedAccessKey,
    ) -> Result<u64, ConnectError> {
        let (token, expiry) = sign(up, signer, key);
        let audience = format!("{}{}", up.hub_host, id.resource());
        self.ask(first, generation, |reply| Ask::Token {
            audience,
            token: token.to_string(),
            expiry,
            reply,
        })
        .await?;
        Ok(expiry)
    }
}

/// An identity's session on the shared connection, ready for its links.
pub(super) struct Opened {
    session: SessionHandle<()>,
    generation: u64,
    /// Served before the others (the edge's own identity).
    first: bool,
    /// When the token put for it expires (unix seconds).
    expiry: u64,
}

/// Opens `id`'s session on the shared connection and puts its token, or
/// says why not: the connection is down (a network failure, retried when
/// it comes back) or the cloud refused the token (the identity backs off).
/// `first`: the edge's own identity, served before the others.
pub(super) async fn open(
    mux: &Mux,
    up: &Upstream,
    id: &ClientId,
    signer: &ClientId,
    key: &SharedAccessKey,
    first: bool,
) -> Result<Opened, ConnectError> {
    // The connection's own attempt is bounded by the same time-out as
    // this one: wait for its outcome rather than fail before it is known.
    let mut state = mux.state.clone();
    let wait = state.wait_for(|s| matches!(s, MuxState::Up(_)));
    let generation = match tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, wait).await {
        Ok(Ok(s)) => match &*s {
            MuxState::Up(g) => *g,
            MuxState::Down(_) => 0,
        },
        _ => {
            let why = match &*mux.state.borrow() {
                MuxState::Down(why) => why.clone(),
                MuxState::Up(_) => "reconnecting".to_owned(),
            };
            return Err(ConnectError::Failed(format!(
                "upstream AMQP connection down: {why}"
            )));
        }
    };
    // The token first: links of the session need it, and a refused
    // identity then costs the cloud no session.
    let expiry = mux
        .put_token(up, first, generation, id, signer, key)
        .await?;
    let session = mux.ask(first, generation, Ask::Session).await?;
    Ok(Opened {
        session,
        generation,
        first,
        expiry,
    })
}

/// Puts a fresh token for `id` on the connection its session is on; the
/// new expiry.
async fn renew(
    mux: &Mux,
    up: &Upstream,
    opened: (u64, bool),
    id: &ClientId,
    signer: &ClientId,
    key: &SharedAccessKey,
) -> Result<u64, ConnectError> {
    let (generation, first) = opened;
    mux.put_token(up, first, generation, id, signer, key).await
}

/// The connection task: dial, serve the identities, redial; until the hub
/// stops (every identity's handle is gone).
pub(super) async fn run(shared: Arc<Shared>, task: MuxTask) {
    let MuxTask {
        mut first,
        mut rest,
        state,
    } = task;
    let up = &shared.up;
    let interval = Duration::from_millis(up.cfg.reconnect_ms);
    let mut generation = 0u64;
    let mut logged_down = false;
    loop {
        let started = Instant::now();
        let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(up)).await {
            Ok(Ok((mut conn, cbs_session, mut cbs))) => {
                generation += 1;
                tracing::info!(via = %up.transport.dialer.describe(), "upstream AMQP connection open");
                state.send_replace(MuxState::Up(generation));
                let why = serve(&mut conn, &mut cbs, generation, &mut first, &mut rest).await;
                cbs.fail_all("the AMQP connection ended");
                let Some(why) = why else {
                    // The hub is stopping: close politely, briefly.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                    return;
                };
                state.send_replace(MuxState::Down(why.clone()));
                tracing::warn!(reason = %why, retry_every = ?interval, "upstream AMQP connection lost");
                // Logged: the failed attempts that may follow are not.
                logged_down = true;
                drop(cbs);
                drop(cbs_session);
                drop(conn);
                why
            }
            Ok(Err(e)) => e,
            Err(_) => "connection attempt timed out".to_owned(),
        };
        if !logged_down {
            tracing::warn!(reason = %why, retry_every = ?interval, "upstream AMQP connection down");
            logged_down = true;
        } else {
            tracing::debug!(reason = %why, "upstream AMQP connection attempt failed");
        }
        state.send_replace(MuxState::Down(why.clone()));
        // Until the next attempt, requests fail at once (they were made
        // for a connection that is gone).
        let next = (started + interval).max(Instant::now() + Duration::from_millis(10));
        loop {
            let req = tokio::select! {
                r = first.recv() => r,
                r = rest.recv() => r,
                () = tokio::time::sleep_until(next) => break,
            };
            match req {
                Some(req) => req
                    .ask
                    .fail(format!("upstream AMQP connection down: {why}")),
                None => return,
            }
        }
    }
}

/// Dials the cloud (the upstream's dialer: TLS on the AMQP port, or
/// WebSocket with subprotocol `AMQPWSB10`, maybe through a proxy), opens
/// the connection with SASL ANONYMOUS and attaches the `$cbs` links.
async fn connect(
    up: &Upstream,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>, cbs::Cbs), String> {
    let stream = up
        .transport
        .dialer
        .dial()
        .await
        .map_err(|e| e.to_string())?;
    let idle = Duration::from_secs(u64::from(up.cfg.keep_alive_secs.max(1)));
    let mut conn = Connection::builder()
        .container_id(format!("verge-hub-{}", uuid::Uuid::new_v4()))
        .hostname(up.cfg.hostname.as_str())
        .sasl_profile(SaslProfile::Anonymous)
        .max_frame_size(MAX_FRAME)
        // The cloud must send something (a heartbeat at least) this often,
        // or the connection is found dead; fe2o3 sends ours at half the
        // cloud's own idle time-out.
        .idle_time_out(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX))
        // The cloud's frames get the check the hub's own endpoint gives
        // its clients' (fe2o3 allocates whatever size a value declares).
        .open_with_stream(verge_amqp::Checked::new(stream, MAX_FRAME))
        .await
        .map_err(|e| format!("AMQP open: {e}"))?;
    let mut session = Session::begin(&mut conn)
        .await
        .map_err(|e| format!("AMQP begin ($cbs session): {e}"))?;
    let cbs = cbs::Cbs::attach(&mut session).await?;
    Ok((conn, session, cbs))
}

/// Serves requests on connection `generation` until it ends (why) or the
/// hub stops (`None`).
async fn serve(
    conn: &mut ConnectionHandle<()>,
    cbs: &mut cbs::Cbs,
    generation: u64,
    first: &mut mpsc::Receiver<MuxReq>,
    rest: &mut mpsc::Receiver<MuxReq>,
) -> Option<String> {
    let mut expire = tokio::time::interval(HANDSHAKE_TIMEOUT);
    loop {
        let req = tokio::select! {
            biased;
            r = conn.on_close() => {
                return Some(match r {
                    Ok(()) => "closed by the cloud".to_owned(),
                    Err(e) => e.to_string(),
                });
            }
            r = cbs.answer() => {
                if let Err(why) = r {
                    return Some(why);
                }
                continue;
            }
            r = first.recv() => r?,
            r = rest.recv() => r?,
            _ = expire.tick() => {
                // A put-token the cloud never answers fails its identity
                // (which retries), not the connection.
                cbs.expire(HANDSHAKE_TIMEOUT);
                continue;
            }
        };
        if req.generation != generation {
            req.ask.fail("the AMQP connection was replaced".into());
            continue;
        }
        match req.ask {
            Ask::Token {
                audience,
                token,
                expiry,
                reply,
            } => {
                if let Err(why) = cbs.put(&audience, token, expiry, reply) {
                    return Some(why);
                }
            }
            Ask::Session(reply) => {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, Session::begin(conn)).await {
                    Ok(Ok(s)) => {
                        let _ = reply.send(Ok(s));
                    }
                    Ok(Err(e)) => {
                        let why = format!("AMQP begin: {e}");
                        let _ = reply.send(Err(ConnectError::Failed(why.clone())));
                        return Some(why);
                    }
                    Err(_) => {
                        let why = "no BEGIN answer in time".to_owned();
                        let _ = reply.send(Err(ConnectError::Failed(why.clone())));
                        return Some(why);
                    }
                }
            }
        }
    }
}
