//! One MQTT 3.1.1 connection: CONNECT and authentication, then the packet loop
//! (publishes in, deliveries out with bounded inflight, keep-alive). What a
//! publish means is the [`Backend`]'s business.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectAuth, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use verge_core::ClientId;

use crate::Backend;
use crate::auth::Credentials;
use crate::session::{ConnHandle, Outbound, Transport};
use crate::topic::{Inbound, authorized, classify, will_bag};

/// Capacity of each connection's outbound queue.
const OUTBOUND_QUEUE: usize = 64;
/// Telemetry publishes per connection whose durability may be pending at
/// once: they share the backend's group commits instead of paying one
/// fsync each, while PUBACKs still go out in packet order.
const INBOUND_WINDOW: usize = 64;
/// Outgoing bytes buffered before a write even within one loop turn.
const FLUSH_AT: usize = 64 * 1024;
/// Longest wait for a closing write (TLS close_notify).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a connection ended (for logs).
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("client disconnected")]
    Disconnect,
    #[error("socket closed")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("taken over by a new connection")]
    TakenOver,
    #[error("client not reading: a write made no progress for {0:?}")]
    WriteTimeout(Duration),
    #[error("unsupported protocol level {0}")]
    ProtocolLevel(u8),
}

/// The write side. Packets are encoded into `out` and written together once
/// per loop turn ([`Conn::flush`]): one syscall (and one TLS record) for
/// many PUBACKs and deliveries instead of one each.
///
/// Every write has a deadline and gives way to a take-over: a client that
/// stops reading blocks the writer, and keep-alive and `kick` are otherwise
/// only looked at between writes.
struct Conn<W> {
    writer: W,
    out: BytesMut,
    max_packet: usize,
    /// Longest a write may wait for the client to read.
    write_timeout: Duration,
    /// Notified when a new connection takes the session over.
    kick: Option<Arc<Notify>>,
}

/// Resolves when `kick` is notified (never without one).
async fn kicked(kick: Option<&Notify>) {
    match kick {
        Some(k) => k.notified().await,
        None => std::future::pending().await,
    }
}

impl<W: AsyncWrite + Unpin> Conn<W> {
    /// Queues `p`; writes early only when the buffer is large.
    async fn push(&mut self, p: Packet) -> Result<(), Close> {
        p.write(&mut self.out, self.max_packet.max(1 << 20))
            .map_err(|e| Close::Protocol(format!("cannot encode: {e}")))?;
        if self.out.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes whatever is queued, within the write deadline.
    async fn flush(&mut self) -> Result<(), Close> {
        if self.out.is_empty() {
            return Ok(());
        }
        let Self {
            writer,
            out,
            write_timeout,
            kick,
            ..
        } = self;
        let write = async {
            writer.write_all(out).await?;
            writer.flush().await
        };
        let r = tokio::select! {
            r = tokio::time::timeout(*write_timeout, write) => match r {
                Ok(r) => r.map_err(Close::Io),
                Err(_) => Err(Close::WriteTimeout(*write_timeout)),
            },
            () = kicked(kick.as_deref()) => Err(Close::TakenOver),
        };
        out.clear();
        r
    }

    /// Closes the write side (TLS close_notify), briefly: the peer may not read.
    async fn shutdown(&mut self) {
        let bound = self.write_timeout.min(SHUTDOWN_TIMEOUT);
        let _ = tokio::time::timeout(bound, self.writer.shutdown()).await;
    }

    /// Queues `p` and writes it now.
    async fn send(&mut self, p: Packet) -> Result<(), Close> {
        self.push(p).await?;
        self.flush().await
    }
}

/// Reads one packet, reading more bytes as needed.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Packet, Close> {
    loop {
        if let Some(p) = try_parse(buf, max)? {
            return Ok(p);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(Close::Eof);
        }
    }
}

fn try_parse(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, Close> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Packet::read(buf, max) {
        Ok(p) => Ok(Some(p)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(CodecError::InvalidProtocolLevel(l)) => Err(Close::ProtocolLevel(l)),
        Err(CodecError::PayloadSizeLimitExceeded(n)) => Err(Close::Protocol(format!(
            "packet of {n} bytes exceeds the {max}-byte limit"
        ))),
        Err(e) => Err(Close::Protocol(format!("malformed packet: {e}"))),
    }
}

/// Serves one client stream (already TLS-terminated) to the end.
pub async fn serve<B, S>(backend: Arc<B>, stream: S, peer: String)
where
    B: Backend,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    serve_with_certs(backend, stream, peer, Vec::new(), Transport::Mqtt).await;
}

/// [`serve`] for a client that presented `client_certs` (leaf first) in
/// its TLS handshake: they reach [`Backend::authenticate`] in
/// [`Credentials::client_certs`]. `transport` says what carries the stream
/// (TLS or a WebSocket), for [`ConnHandle::transport`].
pub async fn serve_with_certs<B, S>(
    backend: Arc<B>,
    stream: S,
    peer: String,
    client_certs: Vec<crate::auth::CertificateDer<'static>>,
    transport: Transport,
) where
    B: Backend,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limits = backend.limits();
    let (mut reader, writer) = tokio::io::split(stream);
    let max = limits.max_packet_bytes;
    let mut conn = Conn {
        writer,
        out: BytesMut::with_capacity(4096),
        max_packet: max,
        write_timeout: limits.connect_timeout,
        kick: None,
    };
    let mut buf = BytesMut::with_capacity(4096);
    let timeout = limits.connect_timeout;

    // CONNECT.
    let connect = match tokio::time::timeout(timeout, read_packet(&mut reader, &mut buf, max)).await
    {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT in time; closing");
            return;
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            tracing::info!(%peer, packet = ?other.packet_type(), "first packet is not CONNECT; closing");
            return;
        }
        Ok(Err(Close::ProtocolLevel(level))) => {
            tracing::info!(%peer, level, "refusing CONNECT: unsupported protocol level");
            let _ = conn
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    false,
                )))
                .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, reason = %e, "bad CONNECT; closing");
            return;
        }
    };

    let (username, password) = match &connect.auth {
        ConnectAuth::None => (None, None),
        ConnectAuth::Username { username } => (Some(username.as_str()), None),
        ConnectAuth::UsernamePassword { username, password } => {
            (Some(username.as_str()), Some(password.as_ref()))
        }
    };
    let creds = Credentials {
        client_id: &connect.client_id,
        username: username.or(Some("")),
        password,
        client_certs: &client_certs,
    };
    let client = match backend.authenticate(&creds).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, client = %connect.client_id, reason = %e, "CONNECT refused");
            let _ = conn
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::NotAuthorized,
                    false,
                )))
                .await;
            conn.shutdown().await;
            return;
        }
    };
    let client_id = client.to_string();
    // A Will is telemetry sent for the client if it drops without
    // DISCONNECT; one on any other topic refuses the CONNECT, as a publish
    // outside its namespace closes the connection.
    let will = match &connect.last_will {
        None => None,
        Some(w) => match will_bag(&client, &w.topic) {
            Some(bag) => Some((bag, w.message.clone())),
            None => {
                tracing::warn!(%peer, client = %client_id, topic = %w.topic, "CONNECT refused: a Will must be on the client's own telemetry topic");
                let _ = conn
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::NotAuthorized,
                        false,
                    )))
                    .await;
                let _ = conn.writer.shutdown().await;
                return;
            }
        },
    };

    let (tx, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let kick = Arc::new(Notify::new());
    conn.kick = Some(kick.clone());
    // A client that stops reading is closed after its keep-alive period × 1.5
    // (or the connect timeout without keep-alive), even in the middle of a write.
    if connect.keep_alive > 0 {
        conn.write_timeout = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    }
    let sessions = backend.sessions();
    let conn_id = sessions.next_conn_id();
    let handle = ConnHandle {
        id: conn_id,
        transport,
        tx,
        kick: kick.clone(),
    };
    let present = sessions.attach(&client_id, connect.clean_session, handle.clone());
    let link = match backend.connected(&client, &handle).await {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(%peer, client = %client_id, reason = %e, "connection refused by the backend");
            sessions.detach(&client_id, conn_id);
            let _ = conn
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::ServiceUnavailable,
                    false,
                )))
                .await;
            conn.shutdown().await;
            return;
        }
    };
    // The handle's sender is the backend's now; the session keeps a clone.
    drop(handle);
    tracing::info!(%peer, client = %client_id, session_present = present, keep_alive = connect.keep_alive, "client connected");

    let mut session = Session {
        backend: &*backend,
        client: &client,
        client_id: &client_id,
        inflight: HashMap::new(),
        next_pkid: 0,
        pending: VecDeque::with_capacity(INBOUND_WINDOW),
    };
    let result = async {
        conn.push(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            present,
        )))
        .await?;
        let keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let max_inflight = limits.max_inflight;
        let mut last_seen = Instant::now();
        loop {
            // Packets already buffered first, while the inbound window has room.
            while session.pending.len() < INBOUND_WINDOW
                && let Some(p) = try_parse(&mut buf, max)?
            {
                last_seen = Instant::now();
                session.handle(&mut conn, p).await?;
            }
            session.settle_ready(&mut conn).await?;
            conn.flush().await?;
            let room = session.pending.len() < INBOUND_WINDOW;
            // With the window full the client is not being read, so its
            // silence proves nothing: no keep-alive deadline then.
            let deadline = keep_alive.filter(|_| room).map(|k| last_seen + k);
            tokio::select! {
                _ = kick.notified() => return Err(Close::TakenOver),
                r = oldest_durable(session.backend, &mut session.pending) => {
                    r.map_err(|e| Close::Protocol(format!("message refused: {e}")))?;
                    if let Some((qos, pkid, _)) = session.pending.pop_front() {
                        puback(&mut conn, qos, pkid).await?;
                    }
                }
                n = reader.read_buf(&mut buf), if room => {
                    if n? == 0 {
                        return Err(Close::Eof);
                    }
                }
                Some(out) = rx.recv(), if session.inflight.len() < max_inflight => {
                    session.publish(&mut conn, out).await?;
                    // Whatever else is queued goes in the same write.
                    while session.inflight.len() < max_inflight
                        && let Ok(out) = rx.try_recv()
                    {
                        session.publish(&mut conn, out).await?;
                    }
                }
                _ = sleep_until_opt(deadline) => return Err(Close::KeepAlive),
            }
        }
    }
    .await;
    // PUBACKs already earned are still worth sending, unless the client is
    // not reading or another connection has the session.
    let stuck = matches!(result, Err(Close::TakenOver | Close::WriteTimeout(_)));
    if !stuck && !matches!(result, Err(Close::Io(_))) {
        let _ = conn.flush().await;
    }
    sessions.detach(&client_id, conn_id);
    backend.disconnected(&client, link).await;
    let disconnected = matches!(result, Err(Close::Disconnect));
    match result {
        Err(Close::Disconnect) | Err(Close::Eof) => {
            tracing::info!(client = %client_id, "client disconnected");
        }
        Err(e) => tracing::info!(client = %client_id, reason = %e, "connection closed"),
        Ok(()) => {}
    }
    if !stuck {
        conn.shutdown().await;
    }
    if let Some((bag, payload)) = will
        && !disconnected
    {
        publish_will(&*backend, &client, &bag, payload).await;
    }
}

/// How long a Will may take to be accepted by the backend.
const WILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Ingests a client's Will as its telemetry (routes, store), as IoT Hub does
/// when a connection ends without DISCONNECT.
async fn publish_will<B: Backend>(backend: &B, client: &ClientId, bag: &str, payload: Bytes) {
    let ingest = async {
        let mut pending = backend.telemetry_submit(client, bag, payload).await?;
        backend.telemetry_wait(&mut pending).await
    };
    match tokio::time::timeout(WILL_TIMEOUT, ingest).await {
        Ok(Ok(())) => tracing::info!(%client, "Will message sent"),
        Ok(Err(e)) => tracing::warn!(%client, error = %e, "Will message refused"),
        Err(_) => tracing::warn!(%client, "Will message not accepted in time; dropped"),
    }
}

async fn puback<W: AsyncWrite + Unpin>(
    conn: &mut Conn<W>,
    qos: QoS,
    pkid: u16,
) -> Result<(), Close> {
    if qos == QoS::AtLeastOnce {
        conn.push(Packet::PubAck(PubAck::new(pkid))).await
    } else {
        Ok(())
    }
}

/// Telemetry whose durability is pending, in packet order.
type PendingQueue<P> = VecDeque<(QoS, u16, P)>;

/// Waits for the oldest pending telemetry to become durable (forever when
/// there is none). Cancel-safe: [`Backend::telemetry_wait`] is.
async fn oldest_durable<B: Backend>(
    backend: &B,
    pending: &mut PendingQueue<B::Pending>,
) -> Result<(), crate::Rejection> {
    match pending.front_mut() {
        Some((_, _, p)) => backend.telemetry_wait(p).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct Session<'a, B: Backend> {
    backend: &'a B,
    client: &'a ClientId,
    client_id: &'a str,
    inflight: HashMap<u16, Option<oneshot::Sender<()>>>,
    next_pkid: u16,
    /// Telemetry submitted to the backend, not yet durable (at most
    /// [`INBOUND_WINDOW`]); PUBACKed from the front.
    pending: PendingQueue<B::Pending>,
}

impl<B: Backend> Session<'_, B> {
    async fn publish<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
        out: Outbound,
    ) -> Result<(), Close> {
        let pkid = loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                break self.next_pkid;
            }
        };
        let mut p = Publish::new(out.topic, QoS::AtLeastOnce, Vec::new());
        p.payload = out.payload;
        p.pkid = pkid;
        self.inflight.insert(pkid, out.ack);
        conn.push(Packet::Publish(p)).await
    }

    /// PUBACKs every pending message at the front that is already durable,
    /// without waiting.
    async fn settle_ready<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
    ) -> Result<(), Close> {
        while let Some((qos, pkid, p)) = self.pending.front_mut() {
            let (qos, pkid) = (*qos, *pkid);
            match self.backend.telemetry_wait(p).now_or_never() {
                None => break,
                Some(r) => {
                    r.map_err(|e| Close::Protocol(format!("message refused: {e}")))?;
                    self.pending.pop_front();
                    puback(conn, qos, pkid).await?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every pending message is durable and PUBACKed, so that a
    /// publish handled next is acknowledged after them (PUBACKs in order).
    async fn settle_all<W: AsyncWrite + Unpin>(&mut self, conn: &mut Conn<W>) -> Result<(), Close> {
        loop {
            self.settle_ready(conn).await?;
            let Some((qos, pkid, p)) = self.pending.front_mut() else {
                return Ok(());
            };
            let (qos, pkid) = (*qos, *pkid);
            // PUBACKs earned so far go out before we wait.
            conn.flush().await?;
            self.backend
                .telemetry_wait(p)
                .await
                .map_err(|e| Close::Protocol(format!("message refused: {e}")))?;
            self.pending.pop_front();
            puback(conn, qos, pkid).await?;
        }
    }

    /// A QoS 0 response (written with the next flush).
    async fn respond<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
        topic: String,
        payload: Bytes,
    ) -> Result<(), Close> {
        let mut p = Publish::new(topic, QoS::AtMostOnce, Vec::new());
        p.payload = payload;
        conn.push(Packet::Publish(p)).await
    }

    async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
        packet: Packet,
    ) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p).await,
            Packet::PubAck(a) => {
                if let Some(Some(ack)) = self.inflight.remove(&a.pkid) {
                    let _ = ack.send(());
                }
                Ok(())
            }
            Packet::Subscribe(s) => {
                let allowed: Vec<bool> = s
                    .filters
                    .iter()
                    .map(|f| authorized(self.client, &f.path))
                    .collect();
                let wanted: Vec<String> = s
                    .filters
                    .iter()
                    .zip(&allowed)
                    .filter(|(_, ok)| **ok)
                    .map(|(f, _)| f.path.clone())
                    .collect();
                // The session grants up to its cap; beyond it, 0x80.
                let mut kept = self
                    .backend
                    .sessions()
                    .subscribe(self.client_id, &wanted)
                    .into_iter();
                let mut codes = Vec::with_capacity(s.filters.len());
                for (f, ok) in s.filters.iter().zip(allowed) {
                    if !ok {
                        tracing::warn!(client = self.client_id, filter = %f.path, "subscription refused");
                        codes.push(SubscribeReasonCode::Failure);
                    } else if kept.next() != Some(true) {
                        tracing::warn!(client = self.client_id, filter = %f.path, max = crate::session::MAX_SUBSCRIPTIONS, "subscription refused: too many subscriptions");
                        codes.push(SubscribeReasonCode::Failure);
                    } else {
                        codes.push(SubscribeReasonCode::Success(match f.qos {
                            QoS::AtMostOnce => QoS::AtMostOnce,
                            _ => QoS::AtLeastOnce,
                        }));
                    }
                }
                conn.push(Packet::SubAck(SubAck::new(s.pkid, codes))).await
            }
            Packet::Unsubscribe(u) => {
                self.backend
                    .sessions()
                    .unsubscribe(self.client_id, &u.topics);
                conn.push(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
            }
            Packet::PingReq => conn.push(Packet::PingResp).await,
            Packet::Disconnect => Err(Close::Disconnect),
            other => Err(Close::Protocol(format!(
                "unexpected {:?} packet",
                other.packet_type()
            ))),
        }
    }

    async fn on_publish<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
        p: Publish,
    ) -> Result<(), Close> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Close::Protocol("QoS 2 is not supported".into()));
        }
        let Publish {
            topic,
            payload,
            qos,
            pkid,
            ..
        } = p;
        let topic = std::str::from_utf8(&topic)
            .map_err(|_| Close::Protocol("topic is not UTF-8".into()))?;
        let kind = classify(self.client, topic)
            .ok_or_else(|| Close::Protocol(format!("not authorized to publish on {topic:?}")))?;
        if let Inbound::Telemetry { bag } = kind {
            // PUBACK comes when it is durable (the packet loop's window).
            let pending = self
                .backend
                .telemetry_submit(self.client, bag, payload)
                .await
                .map_err(|e| Close::Protocol(format!("message refused: {e}")))?;
            self.pending.push_back((qos, pkid, pending));
            return Ok(());
        }
        // Not telemetry: its PUBACK must follow those still pending.
        self.settle_all(conn).await?;
        match kind {
            Inbound::Telemetry { .. } => Ok(()),
            Inbound::TwinGet { rid } => {
                puback(conn, qos, pkid).await?;
                let (topic, body) = match self.backend.twin_get(self.client).await {
                    Ok(twin) => (
                        format!("$iothub/twin/res/200/?$rid={rid}"),
                        // Serializing a Value cannot fail.
                        serde_json::to_vec(&twin).unwrap_or_default(),
                    ),
                    Err(e) => {
                        tracing::warn!(client = self.client_id, error = %e, "twin GET refused");
                        (
                            format!("$iothub/twin/res/{}/?$rid={rid}", e.status),
                            Vec::new(),
                        )
                    }
                };
                self.respond(conn, topic, body.into()).await
            }
            Inbound::TwinReported { rid } => {
                puback(conn, qos, pkid).await?;
                let result = match serde_json::from_slice::<serde_json::Value>(&payload) {
                    Ok(patch) => self.backend.twin_patch_reported(self.client, patch).await,
                    Err(e) => Err(crate::Rejection::bad_request(format!(
                        "patch is not JSON: {e}"
                    ))),
                };
                let topic = match result {
                    Ok(v) => format!("$iothub/twin/res/204/?$rid={rid}&$version={v}"),
                    Err(e) => {
                        tracing::warn!(client = self.client_id, error = %e, "reported patch refused");
                        format!("$iothub/twin/res/{}/?$rid={rid}", e.status)
                    }
                };
                self.respond(conn, topic, Bytes::new()).await
            }
            Inbound::MethodResponse { status, rid } => {
                puback(conn, qos, pkid).await?;
                self.backend
                    .method_response(self.client, &rid, status, payload)
                    .await;
                Ok(())
            }
            Inbound::Other => {
                tracing::debug!(
                    client = self.client_id,
                    topic,
                    "publish on an unhandled topic ignored"
                );
                puback(conn, qos, pkid).await
            }
        }
    }
}

#[cfg(test)]
mod tests;
