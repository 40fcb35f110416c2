//! verge-dial: open a byte stream to the cloud.
//!
//! One [`Dialer`] per destination: TCP to the cloud, or to an HTTP proxy
//! and a `CONNECT` tunnel through it ([`Proxy`]: `https_proxy`,
//! `no_proxy`, credentials in the URL sent as `Proxy-Authorization:
//! Basic`); then TLS (rustls, with the caller's trust roots); then, for the
//! WebSocket transports, a WebSocket (`wss://host:port{path}` with one
//! subprotocol: `mqtt` for MQTT-WS, `AMQPWSB10` for AMQP-WS) whose binary
//! frames carry the bytes. The result is one [`CloudStream`]
//! (`AsyncRead + AsyncWrite`), so the protocol code above it does not know
//! how it was reached. Every step has its own deadline; each failure is a
//! typed [`DialError`] naming the step (a wrong proxy password, a proxy
//! rule and an unreachable cloud are told apart).

pub mod protocol;
pub mod proxy;
pub mod ws;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use protocol::{Route, UpstreamProtocol};
pub use proxy::{Proxy, ProxyError};
pub use ws::WsIo;

/// Default deadline of each step (TCP connect, proxy answer, TLS handshake,
/// WebSocket upgrade). Callers usually bound the whole dial too.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A step did not finish in time.
    #[error("{step} ({target}): timed out")]
    Timeout {
        /// The step.
        step: &'static str,
        /// Host and port (or proxy) concerned.
        target: String,
    },
    /// TCP to the cloud failed.
    #[error("connect {target}: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// TCP to the proxy failed.
    #[error("connect to proxy {proxy}: {source}")]
    ProxyConnect {
        /// The proxy.
        proxy: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing the CONNECT exchange failed.
    #[error("proxy {proxy}: {source}")]
    ProxyIo {
        /// The proxy.
        proxy: String,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy does not speak HTTP as expected.
    #[error("proxy {proxy}: {why}")]
    ProxyProtocol {
        /// The proxy.
        proxy: String,
        /// What was wrong.
        why: String,
    },
    /// 407 (or 401, which tinyproxy sends): the proxy wants credentials, or
    /// refused those given.
    #[error("{}", if *sent_credentials {
        format!("proxy {proxy} refused the credentials in the proxy URL ({status}): check the user and password in https_proxy")
    } else {
        format!("proxy {proxy} requires authentication ({status}): put user:password in the https_proxy URL")
    })]
    ProxyAuth {
        /// The proxy.
        proxy: String,
        /// Whether credentials were sent.
        sent_credentials: bool,
        /// 407 or 401.
        status: u16,
    },
    /// 403: the proxy's rules forbid this destination or port.
    #[error(
        "proxy {proxy} refuses to tunnel to {target} (403 Forbidden): its rules do not allow this host or port"
    )]
    ProxyForbidden {
        /// The proxy.
        proxy: String,
        /// `host:port`.
        target: String,
    },
    /// 502–504: the proxy could not reach the destination.
    #[error("proxy {proxy} could not reach {target} ({status} {reason})")]
    ProxyUnreachable {
        /// The proxy.
        proxy: String,
        /// `host:port`.
        target: String,
        /// HTTP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// Any other non-2xx answer.
    #[error("proxy {proxy} refused CONNECT to {target}: {status} {reason}")]
    ProxyStatus {
        /// The proxy.
        proxy: String,
        /// `host:port`.
        target: String,
        /// HTTP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// The TLS handshake with the cloud failed (certificate, protocol).
    #[error("TLS with {target}: {source}")]
    Tls {
        /// `host:port`.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The WebSocket upgrade failed (status, subprotocol, framing).
    #[error("WebSocket upgrade at {url}: {why}")]
    WebSocket {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The host name is not valid as a TLS server name.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName {
        /// The name.
        host: String,
    },
}

/// Any byte stream: what [`Dialer::dial`] returns, boxed. `Sync` because
/// rumqttc's socket connector (the SDK's) requires it.
pub trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// A stream to the cloud, however it was reached.
pub type CloudStream = Box<dyn Io>;

// Clients that take any stream often ask for `Debug` (fe2o3-amqp does).
impl std::fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloudStream")
    }
}

/// The WebSocket layer, when used.
#[derive(Debug, Clone)]
struct WebSocket {
    path: String,
    subprotocol: String,
    max_message: usize,
}

/// How to reach one cloud endpoint; cheap to clone, reusable for every
/// connection (each [`Dialer::dial`] opens a new one).
#[derive(Clone)]
pub struct Dialer {
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    proxy: Option<Proxy>,
    websocket: Option<WebSocket>,
    step_timeout: Duration,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Dialer {
    /// TLS to `host:port` (also the TLS server name), trusting what `tls`
    /// trusts; no proxy, no WebSocket until set.
    pub fn new(host: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> Result<Dialer, DialError> {
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|_| DialError::ServerName {
                host: host.to_owned(),
            })?;
        Ok(Dialer {
            host: host.to_owned(),
            port,
            tls: tokio_rustls::TlsConnector::from(tls),
            server_name,
            proxy: None,
            websocket: None,
            step_timeout: DEFAULT_STEP_TIMEOUT,
        })
    }

    /// Goes through `proxy` (a CONNECT tunnel), or straight when `None`.
    pub fn with_proxy(mut self, proxy: Option<Proxy>) -> Dialer {
        self.proxy = proxy;
        self
    }

    /// Speaks WebSocket on `path` (e.g. `/$iothub/websocket`) asking for
    /// `subprotocol` (the server must select it); frames and messages
    /// larger than `max_message` bytes are refused.
    pub fn with_websocket(mut self, path: &str, subprotocol: &str, max_message: usize) -> Dialer {
        self.websocket = Some(WebSocket {
            path: path.to_owned(),
            subprotocol: subprotocol.to_owned(),
            max_message,
        });
        self
    }

    /// Deadline of each step.
    pub fn with_step_timeout(mut self, timeout: Duration) -> Dialer {
        self.step_timeout = timeout;
        self
    }

    /// The proxy in use, if any.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// What a dial does, for logs and `verge check`: e.g.
    /// `wss://hub:443/$iothub/websocket (mqtt) via proxy http://p:3128`.
    pub fn describe(&self) -> String {
        let host = authority(&self.host, self.port);
        let mut s = match &self.websocket {
            Some(ws) => format!("wss://{host}{} ({})", ws.path, ws.subprotocol),
            None => format!("tls://{host}"),
        };
        if let Some(p) = &self.proxy {
            s.push_str(&format!(" via proxy {p}"));
        }
        s
    }

    /// Opens a new stream: TCP (or a proxy tunnel), TLS, WebSocket.
    pub async fn dial(&self) -> Result<CloudStream, DialError> {
        let target = authority(&self.host, self.port);
        let tcp = match &self.proxy {
            Some(p) => p.tunnel(&self.host, self.port, self.step_timeout).await?,
            None => {
                let tcp = tokio::time::timeout(
                    self.step_timeout,
                    TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                .map_err(|_| DialError::Timeout {
                    step: "connecting",
                    target: target.clone(),
                })?
                .map_err(|source| DialError::Connect {
                    target: target.clone(),
                    source,
                })?;
                let _ = tcp.set_nodelay(true);
                tcp
            }
        };
        let tls = tokio::time::timeout(
            self.step_timeout,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| DialError::Timeout {
            step: "TLS handshake",
            target: target.clone(),
        })?
        .map_err(|source| DialError::Tls {
            target: target.clone(),
            source,
        })?;
        let Some(ws) = &self.websocket else {
            return Ok(Box::new(tls));
        };
        let url = format!("wss://{target}{}", ws.path);
        let ws_err = |why: String| DialError::WebSocket {
            url: url.clone(),
            why,
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ws_err(e.to_string()))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&ws.subprotocol).map_err(|e| ws_err(e.to_string()))?,
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(ws.max_message))
            .max_frame_size(Some(ws.max_message));
        // tungstenite checks the 101, the accept key and that the server
        // selected our subprotocol.
        let (socket, _response) = tokio::time::timeout(
            self.step_timeout,
            tokio_tungstenite::client_async_with_config(request, tls, Some(config)),
        )
        .await
        .map_err(|_| DialError::Timeout {
            step: "WebSocket upgrade",
            target: target.clone(),
        })?
        .map_err(|e| ws_err(e.to_string()))?;
        Ok(Box::new(WsIo::new(socket)))
    }
}

/// `host:port`, with IPv6 addresses in brackets.
pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
