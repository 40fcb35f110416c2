//! `UpstreamProtocol`: Azure IoT Edge's four upstream protocol names
//! (`Amqp`, `AmqpWs`, `Mqtt`, `MqttWs`, case-insensitive), shared by the
//! hub and the agent: parsed from the configuration or the
//! `UpstreamProtocol` environment variable, and what actually runs where
//! a client has no AMQP (the agent's twin link, [`UpstreamProtocol::effective`]);
//! the hub's upstream speaks all four ([`Route::native`]).

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// Where IoT Hub serves MQTT and AMQP over WebSocket.
pub const WS_PATH: &str = "/$iothub/websocket";
/// The WebSocket subprotocol of MQTT.
pub const MQTT_SUBPROTOCOL: &str = "mqtt";
/// The WebSocket subprotocol of AMQP (IoT Hub's, as the SDKs send it).
pub const AMQP_SUBPROTOCOL: &str = "AMQPWSB10";
/// IoT Hub's AMQP over TLS port.
pub const AMQP_PORT: u16 = 5671;
/// IoT Hub's MQTT over TLS port.
pub const MQTT_PORT: u16 = 8883;
/// IoT Hub's HTTPS port, where the WebSocket transports are served.
pub const WS_PORT: u16 = 443;

/// edgeHub's default, and so the hub's in the edge environment (the
/// agent's twin link runs it as [`UpstreamProtocol::effective`]); a hub
/// configured by file defaults to `Mqtt` ([`UpstreamProtocol::default`]).
pub const EDGE_DEFAULT: UpstreamProtocol = UpstreamProtocol::Amqp;

/// The environment variable IoT Edge's edgeHub reads.
pub const PROTOCOL_ENV: &str = "UpstreamProtocol";

/// `UpstreamProtocol`: edgeHub's four names, case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum UpstreamProtocol {
    /// AMQP over TLS (5671).
    Amqp,
    /// AMQP over WebSocket (443).
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
    /// What runs in a client that speaks MQTT only (the agent's twin
    /// link): AMQP falls back to MQTT over the same carrier (TLS or WebSocket).
    pub fn effective(self) -> Self {
        match self {
            Self::Amqp => Self::Mqtt,
            Self::AmqpWs => Self::MqttWs,
            other => other,
        }
    }

    /// AMQP, over TLS or WebSocket.
    pub fn amqp(self) -> bool {
        matches!(self, Self::Amqp | Self::AmqpWs)
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

/// How a link reaches the cloud for an `UpstreamProtocol`: what runs, and
/// the proxy, which only the WebSocket transports use (as IoT Edge does).
/// The hub's links, the agent's twin link and `verge check` all go this way.
#[derive(Debug, Clone)]
pub struct Route {
    /// What was asked for.
    pub requested: UpstreamProtocol,
    /// What runs ([`UpstreamProtocol::effective`]).
    pub protocol: UpstreamProtocol,
    /// The proxy to tunnel through (WebSocket transports only).
    pub proxy: Option<crate::Proxy>,
    /// A proxy that is set but not used, because the protocol is not a
    /// WebSocket one (worth a warning).
    pub unused_proxy: Option<crate::Proxy>,
}

impl Route {
    /// The route to `host` for `requested`, with `https_proxy`/`no_proxy`
    /// looked up by `var`.
    pub fn new(
        requested: UpstreamProtocol,
        host: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Route, crate::ProxyError> {
        Self::running(requested, requested.effective(), host, var)
    }

    /// The route of a client that speaks all four protocols (the hub's
    /// upstream): what was asked for runs.
    pub fn native(
        requested: UpstreamProtocol,
        host: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Route, crate::ProxyError> {
        Self::running(requested, requested, host, var)
    }

    fn running(
        requested: UpstreamProtocol,
        protocol: UpstreamProtocol,
        host: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Route, crate::ProxyError> {
        let proxy = crate::Proxy::from_vars(var, host)?;
        let (proxy, unused_proxy) = if protocol.websocket() {
            (proxy, None)
        } else {
            (None, proxy)
        };
        Ok(Route {
            requested,
            protocol,
            proxy,
            unused_proxy,
        })
    }

    /// Whether AMQP was asked for and MQTT runs in its place.
    pub fn falls_back(&self) -> bool {
        self.protocol != self.requested
    }

    /// The port to dial: `https_port` over WebSocket, else `mqtt_port`.
    pub fn port(&self, mqtt_port: u16, https_port: u16) -> u16 {
        if self.protocol.websocket() {
            https_port
        } else {
            mqtt_port
        }
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

    #[test]
    fn routes_use_the_proxy_only_over_websocket() {
        let env = |k: &str| (k == "https_proxy").then(|| "http://p:3128".to_owned());
        let r = Route::new(UpstreamProtocol::Amqp, "hub", env).unwrap();
        assert!(r.falls_back() && r.proxy.is_none() && r.unused_proxy.is_some());
        assert_eq!(r.port(8883, 443), 8883);
        let r = Route::new(UpstreamProtocol::AmqpWs, "hub", env).unwrap();
        assert_eq!(r.protocol, UpstreamProtocol::MqttWs);
        assert!(r.proxy.is_some() && r.unused_proxy.is_none());
        assert_eq!(r.port(8883, 443), 443);
        let r = Route::new(UpstreamProtocol::Mqtt, "hub", |_: &str| None).unwrap();
        assert!(!r.falls_back() && r.proxy.is_none() && r.unused_proxy.is_none());
    }
}
