//! One MQTT 3.1.1 connection: CONNECT and authentication, then the packet loop
//! (publishes in, deliveries out with bounded inflight, keep-alive). What a
//! publish means is the [`Backend`]'s business.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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
use crate::session::{ConnHandle, Outbound};
use crate::topic::{Inbound, authorized, classify};

/// Capacity of each connection's outbound queue.
const OUTBOUND_QUEUE: usize = 64;

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
    #[error("unsupported protocol level {0}")]
    ProtocolLevel(u8),
}

struct Conn<W> {
    writer: W,
    out: BytesMut,
    max_packet: usize,
}

impl<W: AsyncWrite + Unpin> Conn<W> {
    async fn send(&mut self, p: Packet) -> Result<(), Close> {
        self.out.clear();
        p.write(&mut self.out, self.max_packet.max(1 << 20))
            .map_err(|e| Close::Protocol(format!("cannot encode: {e}")))?;
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        Ok(())
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
    let limits = backend.limits();
    let (mut reader, writer) = tokio::io::split(stream);
    let max = limits.max_packet_bytes;
    let mut conn = Conn {
        writer,
        out: BytesMut::with_capacity(4096),
        max_packet: max,
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
            let _ = conn.writer.shutdown().await;
            return;
        }
    };
    let client_id = client.to_string();

    let (tx, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let kick = Arc::new(Notify::new());
    let sessions = backend.sessions();
    let conn_id = sessions.next_conn_id();
    let handle = ConnHandle {
        id: conn_id,
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
            let _ = conn.writer.shutdown().await;
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
    };
    let result = async {
        conn.send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            present,
        )))
        .await?;
        let keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let max_inflight = limits.max_inflight;
        let mut last_seen = Instant::now();
        loop {
            // Packets already buffered first.
            while let Some(p) = try_parse(&mut buf, max)? {
                last_seen = Instant::now();
                session.handle(&mut conn, p).await?;
            }
            let deadline = keep_alive.map(|k| last_seen + k);
            tokio::select! {
                _ = kick.notified() => return Err(Close::TakenOver),
                n = reader.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Err(Close::Eof);
                    }
                }
                Some(out) = rx.recv(), if session.inflight.len() < max_inflight => {
                    session.publish(&mut conn, out).await?;
                }
                _ = sleep_until_opt(deadline) => return Err(Close::KeepAlive),
            }
        }
    }
    .await;
    sessions.detach(&client_id, conn_id);
    backend.disconnected(&client, link).await;
    match result {
        Err(Close::Disconnect) | Err(Close::Eof) => {
            tracing::info!(client = %client_id, "client disconnected");
        }
        Err(e) => tracing::info!(client = %client_id, reason = %e, "connection closed"),
        Ok(()) => {}
    }
    let _ = conn.writer.shutdown().await;
}

async fn puback<W: AsyncWrite + Unpin>(
    conn: &mut Conn<W>,
    qos: QoS,
    pkid: u16,
) -> Result<(), Close> {
    if qos == QoS::AtLeastOnce {
        conn.send(Packet::PubAck(PubAck::new(pkid))).await
    } else {
        Ok(())
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct Session<'a, B> {
    backend: &'a B,
    client: &'a ClientId,
    client_id: &'a str,
    inflight: HashMap<u16, Option<oneshot::Sender<()>>>,
    next_pkid: u16,
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
        conn.send(Packet::Publish(p)).await
    }

    /// A QoS 0 response written straight to the socket.
    async fn respond<W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<W>,
        topic: String,
        payload: Bytes,
    ) -> Result<(), Close> {
        let mut p = Publish::new(topic, QoS::AtMostOnce, Vec::new());
        p.payload = payload;
        conn.send(Packet::Publish(p)).await
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
                let mut granted = Vec::new();
                let mut codes = Vec::new();
                for f in s.filters {
                    if authorized(self.client, &f.path) {
                        codes.push(SubscribeReasonCode::Success(match f.qos {
                            QoS::AtMostOnce => QoS::AtMostOnce,
                            _ => QoS::AtLeastOnce,
                        }));
                        granted.push(f.path);
                    } else {
                        tracing::warn!(client = self.client_id, filter = %f.path, "subscription refused");
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                self.backend.sessions().subscribe(self.client_id, &granted);
                conn.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await
            }
            Packet::Unsubscribe(u) => {
                self.backend
                    .sessions()
                    .unsubscribe(self.client_id, &u.topics);
                conn.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
            }
            Packet::PingReq => conn.send(Packet::PingResp).await,
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
        let topic = std::str::from_utf8(&p.topic)
            .map_err(|_| Close::Protocol("topic is not UTF-8".into()))?
            .to_owned();
        let kind = classify(self.client, &topic)
            .ok_or_else(|| Close::Protocol(format!("not authorized to publish on {topic:?}")))?;
        let (qos, pkid) = (p.qos, p.pkid);
        match kind {
            Inbound::Telemetry { bag } => {
                self.backend
                    .telemetry(self.client, bag, p.payload.clone())
                    .await
                    .map_err(|e| Close::Protocol(format!("message refused: {e}")))?;
                puback(conn, qos, pkid).await
            }
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
                let result = match serde_json::from_slice::<serde_json::Value>(&p.payload) {
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
                    .method_response(self.client, &rid, status, p.payload.clone())
                    .await;
                Ok(())
            }
            Inbound::Other => {
                tracing::debug!(client = self.client_id, %topic, "publish on an unhandled topic ignored");
                puback(conn, qos, pkid).await
            }
        }
    }
}
