//! MQTT over WebSocket on the HTTPS listener: `GET /$iothub/websocket` with
//! subprotocol `mqtt` (what the Azure SDKs send with `websockets=True`).
//! Binary frames carry the MQTT byte stream; [`WsStream`] (verge-endpoint's)
//! turns the socket into `AsyncRead + AsyncWrite` so the same
//! [`crate::connection::serve`] handles it as a TLS connection on the MQTT port.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use verge_endpoint::session::Transport;

use crate::HubState;
pub use verge_endpoint::ws::WsStream;

/// The path clients open.
pub const PATH: &str = "/$iothub/websocket";
/// The only subprotocol served (edgeHub also tells AMQP apart by it).
pub const SUBPROTOCOL: &str = "mqtt";
/// The path uamqp (and azure-eventhub) open for AMQP over WebSocket.
pub const SERVICEBUS_PATH: &str = "/$servicebus/websocket";
/// AMQP over WebSocket; edgeHub picks the protocol by subprotocol alone.
pub const AMQP_SUBPROTOCOL: &str = "AMQPWSB10";

/// The certificate chain the client presented in the HTTPS listener's TLS
/// handshake (X.509 leaf devices over WebSocket).
#[derive(Debug, Clone)]
pub struct ClientCerts(pub Arc<Vec<verge_endpoint::auth::CertificateDer<'static>>>);

/// Upgrades the request and serves MQTT on the WebSocket.
pub(crate) async fn upgrade(
    State(state): State<Arc<HubState>>,
    peer: Option<axum::Extension<crate::methods::Peer>>,
    certs: Option<axum::Extension<ClientCerts>>,
    guard: Option<axum::Extension<verge_listen::ConnGuard>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols([SUBPROTOCOL, AMQP_SUBPROTOCOL]);
    if ws
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == AMQP_SUBPROTOCOL.as_bytes())
    {
        return amqp_upgrade(state, peer, certs, guard, ws);
    }
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
    let certs = certs.map_or_else(Vec::new, |axum::Extension(c)| c.0.as_ref().clone());
    // An MQTT packet may span frames; a frame or message larger than the
    // largest packet (plus slack for framing) is refused by the WebSocket layer.
    let max = state.cfg.limits.max_packet_bytes.saturating_add(64 * 1024);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            tracing::debug!(%peer, "MQTT over WebSocket");
            // The HTTPS listener's permit stays taken while the socket lives.
            let _guard = guard;
            // Spawned by the upgrade, outside the listener's JoinSet: stop with the hub.
            let stop = state.clone();
            tokio::select! {
                () = crate::connection::serve_with_certs(state, certs, WsStream::new(socket), format!("{peer} (ws)"), Transport::MqttWs) => {}
                () = stop.stopped() => {}
            }
        })
}

/// Serves AMQP on an upgraded WebSocket (`AMQPWSB10`).
fn amqp_upgrade(
    state: Arc<HubState>,
    peer: Option<axum::Extension<crate::methods::Peer>>,
    certs: Option<axum::Extension<ClientCerts>>,
    guard: Option<axum::Extension<verge_listen::ConnGuard>>,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = peer.map_or_else(|| "?".to_owned(), |axum::Extension(p)| p.0.to_string());
    let certs = certs.map_or_else(Vec::new, |axum::Extension(c)| c.0.as_ref().clone());
    let cfg = state.cfg.limits.amqp();
    // AMQP frames may span WebSocket messages; one larger than a frame plus
    // slack is refused by the WebSocket layer.
    let max = (cfg.max_frame_size as usize).saturating_add(64 * 1024);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            tracing::debug!(%peer, "AMQP over WebSocket");
            let _guard = guard;
            // Spawned by the upgrade, outside the listener's JoinSet: stop with the hub.
            let stop = state.shutdown.token();
            verge_amqp::serve_with_certs(
                state,
                WsStream::new(socket),
                format!("{peer} (amqp-ws)"),
                cfg,
                stop,
                certs,
                Transport::AmqpWs,
            )
            .await;
        })
}
