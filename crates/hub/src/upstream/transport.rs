//! How the upstream reaches the cloud: the protocol (`upstream.protocol` in
//! the configuration, overridden by Azure IoT Edge's `UpstreamProtocol`
//! environment variable) and the HTTP proxy (`https_proxy`), turned into
//! one [`verge_dial::Dialer`] that every link dials.
//!
//! * `Mqtt` (default): MQTT over TLS on `upstream.port` (8883).
//! * `MqttWs`: MQTT over WebSocket (`wss://{hostname}:{https_port}/$iothub/websocket`,
//!   subprotocol `mqtt`), through the proxy when `https_proxy` is set and
//!   `no_proxy` does not exempt the host.
//! * `Amqp`: AMQP 1.0 over TLS on `upstream.amqp_port` (5671), one
//!   connection for every identity ([`super::amqp`]).
//! * `AmqpWs`: the same over WebSocket (subprotocol `AMQPWSB10`) on 443,
//!   through the proxy as `MqttWs`.
//!
//! A proxy is used only with a WebSocket protocol, as IoT Edge does: with
//! `Mqtt` on 8883 or `Amqp` on 5671 a configured proxy is ignored, with a
//! warning (most proxies refuse CONNECT to those ports anyway).

use std::sync::Arc;

pub use verge_dial::protocol::{
    AMQP_SUBPROTOCOL, MQTT_SUBPROTOCOL, PROTOCOL_ENV, UnknownProtocol, UpstreamProtocol, WS_PATH,
};
use verge_dial::{Dialer, Route};

use super::{HANDSHAKE_TIMEOUT, MAX_INBOUND_PACKET, MAX_OUTBOUND_PACKET};
use crate::config::UpstreamConfig;

/// The protocol and proxy in force, and the dialer they give.
pub struct Transport {
    /// As configured.
    pub requested: UpstreamProtocol,
    /// What runs (the same: the hub speaks all four).
    pub protocol: UpstreamProtocol,
    /// Every link's dialer.
    pub dialer: Dialer,
}

impl Transport {
    /// Resolves the protocol and proxy (`var` looks environment variables
    /// up) and builds the dialer; logs the AMQP fallback and an ignored proxy.
    pub fn resolve(
        up: &UpstreamConfig,
        tls: Arc<rustls::ClientConfig>,
        var: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Transport> {
        let requested = UpstreamProtocol::resolve(up.protocol, &var)?;
        let route = Route::native(requested, &up.hostname, &var)?;
        let protocol = route.protocol;
        if let Some(p) = &route.unused_proxy {
            tracing::warn!(
                proxy = %p,
                protocol = %protocol,
                "https_proxy is set but the upstream protocol is not a WebSocket one: \
                 the proxy is not used (set UpstreamProtocol=MqttWs or AmqpWs to go through it)"
            );
        }
        let port = match protocol {
            UpstreamProtocol::Amqp => up.amqp_port,
            _ => route.port(up.port, up.https_port),
        };
        let mut dialer = Dialer::new(&up.hostname, port, tls)?.with_step_timeout(HANDSHAKE_TIMEOUT);
        if protocol.websocket() {
            // A packet may span frames; a frame or message larger than the
            // largest packet either way (plus framing slack) is refused.
            let max = MAX_INBOUND_PACKET.max(MAX_OUTBOUND_PACKET) + 64 * 1024;
            let subprotocol = if protocol.amqp() {
                AMQP_SUBPROTOCOL
            } else {
                MQTT_SUBPROTOCOL
            };
            dialer = dialer
                .with_websocket(WS_PATH, subprotocol, max)
                .with_proxy(route.proxy);
        }
        tracing::info!(protocol = %protocol, via = %dialer.describe(), "upstream transport");
        Ok(Transport {
            requested,
            protocol,
            dialer,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_key_alias_and_bad_names() {
        let base = r#"
iothub_hostname = "hub.example"
device_id = "edge1"
device_key = "AAAAAAAAAAAAAAAAAAAAAA=="
storage_dir = "/tmp/x"
[tls]
cert = "c.pem"
key = "k.pem"
[upstream]
hostname = "cloud"
ca_file = "ca.pem"
"#;
        let cfg = |extra: &str| crate::config::Config::from_toml(&format!("{base}{extra}"));
        let up = |extra: &str| cfg(extra).unwrap().upstream.unwrap().protocol;
        assert_eq!(up(""), None);
        assert_eq!(
            up("protocol = \"MQTTWS\"\n"),
            Some(UpstreamProtocol::MqttWs)
        );
        assert_eq!(
            up("upstream_protocol = \"amqp\"\n"),
            Some(UpstreamProtocol::Amqp)
        );
        let e = cfg("protocol = \"Http\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown upstream protocol"), "{e}");
    }
}
