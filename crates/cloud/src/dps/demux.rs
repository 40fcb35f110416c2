//! The device endpoint's port carries IoT Hub's MQTT and DPS's: the first
//! packet (the CONNECT) is read here and its username decides who serves
//! the connection (see [`super::mqtt`] for why one port).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{ConnectAuth, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use verge_endpoint::Backend as _;
use verge_endpoint::session::Transport;

use crate::device::CloudBackend;

/// A stream whose first bytes were already read: they are returned first.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one TLS-terminated device connection: DPS when its CONNECT
/// carries a DPS username and a DPS is configured, IoT Hub otherwise.
pub async fn serve<S>(
    backend: Arc<CloudBackend>,
    mut stream: S,
    peer: String,
    certs: Vec<verge_endpoint::auth::CertificateDer<'static>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(dps) = backend.dps() else {
        verge_endpoint::connection::serve_with_certs(backend, stream, peer, certs, Transport::Mqtt)
            .await;
        return;
    };
    let limits = backend.limits();
    let mut buf = BytesMut::with_capacity(1024);
    let read_first = async {
        loop {
            // Parsed from a copy: the IoT Hub side re-reads these bytes.
            let mut probe = buf.clone();
            match Packet::read(&mut probe, limits.max_packet_bytes) {
                Ok(p) => return Ok(Some((p, probe))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                // Not ours to judge: the endpoint answers bad CONNECTs.
                Err(_) => return Ok(None),
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
    };
    let first: io::Result<_> = match tokio::time::timeout(limits.connect_timeout, read_first).await
    {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(%peer, "no CONNECT in time; closing");
            return;
        }
    };
    match first {
        Err(e) => tracing::debug!(%peer, error = %e, "closed before CONNECT"),
        Ok(Some((Packet::Connect(c), rest)))
            if matches!(&c.auth, ConnectAuth::Username { username } | ConnectAuth::UsernamePassword { username, .. }
                if super::mqtt::is_dps_username(username).is_some()) =>
        {
            super::mqtt::serve(dps, stream, rest, c, peer, certs).await;
        }
        Ok(_) => {
            let stream = Prefixed {
                prefix: buf.freeze(),
                inner: stream,
            };
            verge_endpoint::connection::serve_with_certs(
                backend,
                stream,
                peer,
                certs,
                Transport::Mqtt,
            )
            .await;
        }
    }
}
