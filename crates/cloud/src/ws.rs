//! MQTT and AMQP over WebSocket on the service API's HTTPS listener, as IoT
//! Hub serves them on 443: `GET /$iothub/websocket` with subprotocol `mqtt`
//! or `AMQPWSB10` (uamqp also opens `/$servicebus/websocket`). Binary frames
//! carry the byte stream; verge-endpoint's `WsStream` turns the socket into
//! a byte stream, so the device endpoint's own connection code
//! ([`verge_endpoint::connection::serve`], or [`verge_amqp::serve`], with
//! [`CloudBackend`]) serves it exactly as a TLS connection on 8883 or 5671.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use verge_endpoint::session::Transport;
use verge_endpoint::ws::WsStream;
use verge_listen::CancellationToken;

use crate::device::CloudBackend;

/// The path clients open.
pub const PATH: &str = "/$iothub/websocket";
/// The MQTT subprotocol.
pub const SUBPROTOCOL: &str = "mqtt";
/// AMQP over WebSocket, told apart by its subprotocol alone (as IoT Hub).
pub const AMQP_SUBPROTOCOL: &str = "AMQPWSB10";
/// The path uamqp (and azure-eventhub) open for AMQP over WebSocket.
pub const SERVICEBUS_PATH: &str = "/$servicebus/websocket";

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
        // uamqp's fixed WebSocket path, which it sends with a trailing slash.
        .route(SERVICEBUS_PATH, get(upgrade))
        .route("/$servicebus/websocket/", get(upgrade))
        .with_state(WsState { backend, stop })
}

async fn upgrade(
    State(st): State<WsState>,
    guard: Option<axum::Extension<verge_listen::ConnGuard>>,
    chain: Option<axum::Extension<crate::api::device_auth::PeerCertificates>>,
    ws: WebSocketUpgrade,
) -> Response {
    // X.509 devices authenticate by the HTTPS connection's certificate.
    let certs = chain.map_or_else(Vec::new, |axum::Extension(c)| c.0.as_ref().clone());
    let ws = ws.protocols([SUBPROTOCOL, AMQP_SUBPROTOCOL]);
    if ws
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == AMQP_SUBPROTOCOL.as_bytes())
    {
        let cfg = verge_amqp::Config::default();
        // AMQP frames may span WebSocket messages; one larger than a frame
        // plus slack is refused by the WebSocket layer.
        let max = (cfg.max_frame_size as usize).saturating_add(64 * 1024);
        return ws
            .max_message_size(max)
            .max_frame_size(max)
            .on_upgrade(move |socket| async move {
                let _guard = guard;
                verge_amqp::serve_with_certs(
                    st.backend,
                    WsStream::new(socket),
                    "(amqp-ws)".to_owned(),
                    cfg,
                    st.stop,
                    certs,
                    Transport::AmqpWs,
                )
                .await;
            });
    }
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
                () = verge_endpoint::connection::serve_with_certs(st.backend, WsStream::new(socket), "(ws)".to_owned(), certs, Transport::MqttWs) => {}
                () = st.stop.cancelled() => {}
            }
        })
}
