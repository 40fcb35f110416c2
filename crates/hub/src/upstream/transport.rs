//! How the upstream reaches the cloud: the protocol (`upstream.protocol` in
//! the configuration, overridden by Azure IoT Edge's `UpstreamProtocol`
//! environment variable) and the HTTP proxy (`https_proxy`), turned into
//! one [`verge_dial::Dialer`] that every link dials.
//!
//! * `Mqtt` (default): MQTT over TLS on `upstream.port` (8883).
//! * `MqttWs`: MQTT over WebSocket (`wss://{hostname}:{https_port}/$iothub/websocket`,
//!   subprotocol `mqtt`), through the proxy when `https_proxy` is set and
//!   `no_proxy` does not exempt the host.
//! * `Amqp` / `AmqpWs`: accepted (they are edgeHub's names and its
//!   default), but Verge has no AMQP upstream yet: they run as `Mqtt` /
//!   `MqttWs` with a warning at start.
//!
//! A proxy is used only with a WebSocket protocol, as IoT Edge does: with
//! `Mqtt` on 8883 a configured proxy is ignored, with a warning (most
//! proxies refuse CONNECT to 8883 anyway).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use verge_dial::{Dialer, Proxy};

use super::{HANDSHAKE_TIMEOUT, MAX_INBOUND_PACKET, MAX_OUTBOUND_PACKET};
use crate::config::UpstreamConfig;

/// The environment variable IoT Edge's edgeHub reads.
pub const PROTOCOL_ENV: &str = "UpstreamProtocol";
/// Where IoT Hub serves MQTT and AMQP over WebSocket.
pub const WS_PATH: &str = "/$iothub/websocket";
/// The WebSocket subprotocol of MQTT.
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// `UpstreamProtocol`: edgeHub's four names, case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum UpstreamProtocol {
    /// AMQP over TLS (5671): not implemented upstream yet, runs as `Mqtt`.
    Amqp,
    /// AMQP over WebSocket (443): not implemented upstream yet, runs as `MqttWs`.
    AmqpWs,
    /// MQTT over TLS (8883).
    #[default]
    Mqtt,
    /// MQTT over WebSocket (443).
    MqttWs,
}

/// A protocol name that is none of the four.
#[derive(Debug, thiserror::Error)]
#[error("unknown upstream protocol {0:?}: expected Amqp, AmqpWs, Mqtt or MqttWs")]
pub struct UnknownProtocol(String);

impl FromStr for UpstreamProtocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, UnknownProtocol> {
        match s.trim().to_ascii_lowercase().as_str() {
            "amqp" => Ok(Self::Amqp),
            "amqpws" => Ok(Self::AmqpWs),
            "mqtt" => Ok(Self::Mqtt),
            "mqttws" => Ok(Self::MqttWs),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

impl TryFrom<String> for UpstreamProtocol {
    type Error = UnknownProtocol;

    fn try_from(s: String) -> Result<Self, UnknownProtocol> {
        s.parse()
    }
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Amqp => "Amqp",
            Self::AmqpWs => "AmqpWs",
            Self::Mqtt => "Mqtt",
            Self::MqttWs => "MqttWs",
        })
    }
}

impl UpstreamProtocol {
    /// What actually runs: AMQP falls back to MQTT over the same carrier
    /// (TLS or WebSocket) until the AMQP upstream exists.
    pub fn effective(self) -> Self {
        match self {
            Self::Amqp => Self::Mqtt,
            Self::AmqpWs => Self::MqttWs,
            other => other,
        }
    }

    /// Over WebSocket on 443 (and so through a proxy if one is set).
    pub fn websocket(self) -> bool {
        matches!(self, Self::AmqpWs | Self::MqttWs)
    }

    /// The protocol asked for: `UpstreamProtocol` from the environment
    /// (`var` looks it up) when set and not empty, else the file's.
    pub fn resolve(
        file: Option<Self>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, UnknownProtocol> {
        match var(PROTOCOL_ENV).filter(|v| !v.trim().is_empty()) {
            Some(v) => v.parse(),
            None => Ok(file.unwrap_or_default()),
        }
    }
}

/// The protocol and proxy in force, and the dialer they give.
pub struct Transport {
    /// As configured (before the AMQP fallback).
    pub requested: UpstreamProtocol,
    /// What runs.
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
        let protocol = requested.effective();
        if protocol != requested {
            tracing::warn!(
                requested = %requested,
                using = %protocol,
                "the AMQP upstream is not implemented yet: using MQTT over the same transport"
            );
        }
        let proxy = Proxy::from_vars(&var, &up.hostname)?;
        let port = if protocol.websocket() {
            up.https_port
        } else {
            up.port
        };
        let mut dialer = Dialer::new(&up.hostname, port, tls)?.with_step_timeout(HANDSHAKE_TIMEOUT);
        if protocol.websocket() {
            // A packet may span frames; a frame or message larger than the
            // largest packet either way (plus framing slack) is refused.
            let max = MAX_INBOUND_PACKET.max(MAX_OUTBOUND_PACKET) + 64 * 1024;
            dialer = dialer
                .with_websocket(WS_PATH, MQTT_SUBPROTOCOL, max)
                .with_proxy(proxy);
        } else if let Some(p) = proxy {
            tracing::warn!(
                proxy = %p,
                protocol = %protocol,
                "https_proxy is set but the upstream protocol is not a WebSocket one: \
                 the proxy is not used (set UpstreamProtocol=MqttWs to go through it)"
            );
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
    fn names_are_case_insensitive_and_amqp_falls_back() {
        for (s, p) in [
            ("Amqp", UpstreamProtocol::Amqp),
            ("AMQPWS", UpstreamProtocol::AmqpWs),
            ("mqtt", UpstreamProtocol::Mqtt),
            (" MqttWs ", UpstreamProtocol::MqttWs),
        ] {
            assert_eq!(s.parse::<UpstreamProtocol>().unwrap(), p);
        }
        assert!("mqtt-ws".parse::<UpstreamProtocol>().is_err());
        assert_eq!(UpstreamProtocol::Amqp.effective(), UpstreamProtocol::Mqtt);
        assert_eq!(
            UpstreamProtocol::AmqpWs.effective(),
            UpstreamProtocol::MqttWs
        );
        assert_eq!(
            UpstreamProtocol::MqttWs.effective(),
            UpstreamProtocol::MqttWs
        );
        assert!(UpstreamProtocol::AmqpWs.websocket() && !UpstreamProtocol::Mqtt.websocket());
    }

    #[test]
    fn environment_overrides_the_file() {
        let none = |_: &str| None;
        let env = |v: &'static str| move |k: &str| (k == PROTOCOL_ENV).then(|| v.to_owned());
        assert_eq!(
            UpstreamProtocol::resolve(None, none).unwrap(),
            UpstreamProtocol::Mqtt
        );
        assert_eq!(
            UpstreamProtocol::resolve(Some(UpstreamProtocol::MqttWs), none).unwrap(),
            UpstreamProtocol::MqttWs
        );
        assert_eq!(
            UpstreamProtocol::resolve(Some(UpstreamProtocol::Mqtt), env("mqttws")).unwrap(),
            UpstreamProtocol::MqttWs
        );
        assert_eq!(
            UpstreamProtocol::resolve(Some(UpstreamProtocol::MqttWs), env("")).unwrap(),
            UpstreamProtocol::MqttWs
        );
        assert!(UpstreamProtocol::resolve(None, env("Http")).is_err());
    }
}
