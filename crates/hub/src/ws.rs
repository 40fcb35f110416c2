//! MQTT over WebSocket on the HTTPS listener: `GET /$iothub/websocket` with
//! subprotocol `mqtt` (what the Azure SDKs send with `websockets=True`).
//! Binary frames carry the MQTT byte stream; [`WsStream`] turns the socket
//! into `AsyncRead + AsyncWrite` so the same [`crate::connection::serve`]
//! handles it as a TLS connection on the MQTT port.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::HubState;

/// The path clients open.
pub const PATH: &str = "/$iothub/websocket";
/// The only subprotocol served (edgeHub also tells AMQP apart by it).
pub const SUBPROTOCOL: &str = "mqtt";

/// Upgrades the request and serves MQTT on the WebSocket.
pub(crate) async fn upgrade(
    State(state): State<Arc<HubState>>,
    peer: Option<axum::Extension<crate::methods::Peer>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({
                "message": format!("WebSocket subprotocol must be {SUBPROTOCOL:?}")
            })),
        )
            .into_response();
    }
    let peer = peer.map_or_else(|| "?".to_owned(), |axum::Extension(p)| p.0.to_string());
    // An MQTT packet may span frames; a frame or message larger than the
    // largest packet (plus slack for framing) is refused by the WebSocket layer.
    let max = state.cfg.limits.max_packet_bytes.saturating_add(64 * 1024);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            tracing::debug!(%peer, "MQTT over WebSocket");
            // Spawned by the upgrade, outside the listener's JoinSet: stop with the hub.
            let stop = state.clone();
            tokio::select! {
                () = crate::connection::serve(state, WsStream::new(socket), format!("{peer} (ws)")) => {}
                () = stop.stopped() => {}
            }
        })
}

/// A WebSocket seen as a byte stream: reads yield the payloads of binary
/// frames in order; each write is sent as one binary frame.
pub struct WsStream<S = WebSocket> {
    ws: S,
    pending: Bytes,
}

impl<S> WsStream<S> {
    /// Wraps a WebSocket.
    pub fn new(ws: S) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
        }
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // End of stream: a read of zero bytes.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )));
                }
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
