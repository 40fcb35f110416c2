//! The hub's AMQP listener (AMQPS, IoT Hub's port 5671): TLS through
//! `verge-listen` (permits, handshake deadline), then verge-amqp's device
//! endpoint over the same backend as MQTT.

use std::sync::Arc;

use tokio::net::TcpListener;

use verge_endpoint::session::Transport;

use crate::HubState;

/// Accepts AMQPS connections until the hub stops.
pub(crate) async fn listener(
    state: Arc<HubState>,
    listener: verge_listen::Listener<TcpListener>,
    tls: tokio_rustls::TlsAcceptor,
) {
    let cfg = state.cfg.limits.amqp();
    listener
        .run(
            move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
                let (state, tls) = (state.clone(), tls.clone());
                async move {
                    let _ = tcp.set_nodelay(true);
                    let peer = conn.peer().to_string();
                    match conn.handshake(tls.accept(tcp)).await {
                        Some(Ok(stream)) => {
                            let stop = conn.cancel_token().clone();
                            // X.509 leaf devices authenticate by this chain.
                            let certs = crate::tls::client_certs(&stream);
                            verge_amqp::serve_with_certs(
                                state,
                                stream,
                                peer,
                                cfg,
                                stop,
                                certs,
                                Transport::Amqp,
                            )
                            .await;
                        }
                        Some(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        None => {}
                    }
                }
            },
        )
        .await;
}
