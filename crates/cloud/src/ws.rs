//! MQTT over WebSocket on the service API's HTTPS listener, as IoT Hub
//! serves it on 443: `GET /$iothub/websocket` with subprotocol `mqtt`.
//! Binary frames carry the MQTT byte stream; verge-endpoint's `WsStream`
//! turns the socket into a byte stream, so the device endpoint's own
//! connection code ([`verge_endpoint::connection::serve`] with
//! [`CloudBackend`]) serves it exactly as a TLS connection on 8883.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use verge_endpoint::ws::WsStream;
use verge_listen::CancellationToken;

use crate::device::CloudBackend;

/// The path clients open.
pub const PATH: &str = "/$iothub/websocket";
/// The subprotocol served.
pub const SUBPROTOCOL: &str = "mqtt";

#[derive(Clone)]
struct WsState {
    backend: Arc<CloudBackend>,
    /// Upgraded connections are spawned outside the listener's tasks: they
    /// end when this is cancelled (the server stopping).
    stop: CancellationToken,
}

/// The WebSocket route, to merge into the service API's router (outside
/// its policy check: MQTT authenticates in CONNECT).
pub fn router(backend: Arc<CloudBackend>, stop: CancellationToken) -> Router {
    Router::new()
        .route(PATH, get(upgrade))
        .with_state(WsState { backend, stop })
}

async fn upgrade(
    State(st): State<WsState>,
    guard: Option<axum::Extension<verge_listen::ConnGuard>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            format!("WebSocket subprotocol must be {SUBPROTOCOL:?}"),
        )
            .into_response();
    }
    // An MQTT packet may span frames; nothing larger than the endpoint's
    // largest packet (plus framing slack) is accepted.
    use verge_endpoint::Backend as _;
    let max = st
        .backend
        .limits()
        .max_packet_bytes
        .saturating_add(64 * 1024);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            // The listener's permit stays taken while the socket lives.
            let _guard = guard;
            tokio::select! {
                () = verge_endpoint::connection::serve(st.backend, WsStream::new(socket), "(ws)".to_owned()) => {}
                () = st.stop.cancelled() => {}
            }
        })
}
